"""Stage 5, ``alexnet-deploy validate``: prove an engine against its FP32 reference on real images.

Examples::

    alexnet-deploy validate --engine engines/int8 --reference train/cifar10/best.pt \\
        --data ../shared/data/cifar10_test_2k.npz --json int8-validation.json
    alexnet-deploy validate --engine engines/fp16 --reference model.onnx \\
        --data ../shared/data/imagenette_val300 --min-agreement 0.999

The engine and the reference see the same images, preprocessed once with the spec in the
engine's sidecar (a reference whose own spec differs is refused: it would be a different
experiment). The reference is a ``.pt`` checkpoint (the PyTorch single-device model, FP32) or an
``.onnx`` export (ONNX Runtime, FP32, the canonical graph as exported). Labels come from the data
(image folder or ``.npz``) and are matched to the engine's classes by name, by folder id, or for
1000-class engines by the ImageNet-1k index in ``classes.tsv``.

Metrics (fractions in 0..1 unless said otherwise), accumulated batch by batch in bounded memory:

* ``top1`` / ``top5`` of engine and reference against the labels, and per class;
* ``top1_agreement``: fraction of images whose top-1 class is the same for engine and reference;
* ``top5_overlap``: mean over images of ``|top5(engine) & top5(reference)| / 5``;
* ``max_abs_logit_error`` / ``mean_abs_logit_error``: of ``engine - reference`` over all logits;
* ``cosine_similarity``: mean over images of the cosine of the two logit vectors (and the minimum);
* ``nonfinite_logits``: NaN or Inf values in the engine's logits (any is a failure).

Thresholds: the run fails (exit status 1, each failed check named) when the top-1 drop
``100 * (reference.top1 - engine.top1)`` exceeds ``--max-top1-drop`` percentage points, when
``top1_agreement`` is below ``--min-agreement`` (both compared in whole images, so a drop of
exactly the limit passes), when the engine produced a NaN/Inf, or when a logit is outside the
tolerance: off by more than ``--atol`` and by more than ``--rtol * |reference logit|``
(Polygraphy's elementwise check; defaults per precision in :data:`LOGIT_TOLERANCE`, printed and
written to the JSON).

The reference must be the model the engine was built from: its sha256 (or, for an ``.onnx``,
that of the checkpoint it was exported from) is compared with the ``source`` recorded in the
engine's sidecar; another model is refused unless ``--allow-other-reference`` is given, since
the differences would then be the models', not the engine's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alexnet_deploy.checkpoint import load_checkpoint
from alexnet_deploy.data import SkippedImages, iter_batches, label_map, open_dataset
from alexnet_deploy.engine import Engine, load_engine
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import check_output, sha256_file, write_json_atomic
from alexnet_deploy.metadata import check_alexnet_graph, load_onnx, read_model_info
from alexnet_deploy.onnxrt import cpu_session

if TYPE_CHECKING:
    from alexnet_deploy.data import ImageDataset
    from alexnet_deploy.preprocess import PreprocessSpec

TOPK = 5
#: Polygraphy-like logit tolerances per engine precision, ``(atol, rtol)``: a logit fails only
#: when it is off by more than ``atol`` AND by more than ``rtol * |reference|``. FP16 engines
#: measured max |err| 0.006 on trained models (docs/results.md); INT8 and mixed engines are
#: judged by the top-1 drop and agreement, so their logits are not checked unless asked.
LOGIT_TOLERANCE: dict[str, tuple[float, float] | None] = {
    "fp32": (1e-3, 1e-3), "fp16": (5e-2, 1e-2), "int8": None, "mixed": None}


def logit_tolerance(precision: str, atol: float | None = None, rtol: float | None = None
                    ) -> tuple[float | None, float | None, str]:
    """``(atol, rtol, where they came from)`` for an engine of ``precision``: the options where
    given (the other one then defaults to the precision's, or 0), else :data:`LOGIT_TOLERANCE`
    (``None, None`` when the precision has none)."""
    default = LOGIT_TOLERANCE.get(precision)
    if atol is None and rtol is None:
        if default is None:
            return None, None, f"none for {precision}"
        return default[0], default[1], f"default for {precision}"
    base = default or (0.0, 0.0)
    return (base[0] if atol is None else atol), (base[1] if rtol is None else rtol), \
        "--atol/--rtol"


@dataclass
class ValidationResult:
    """Engine vs reference on one data set; see the module docstring for each metric."""

    engine: str
    backend: str
    precision: str
    reference: str
    data: str
    num_images: int
    engine_top1: float
    engine_top5: float
    reference_top1: float
    reference_top5: float
    top1_agreement: float
    top5_overlap: float
    max_abs_logit_error: float
    mean_abs_logit_error: float
    cosine_similarity: float
    min_cosine_similarity: float
    nonfinite_logits: int
    per_class: dict[str, dict[str, float]]
    max_top1_drop: float
    min_agreement: float
    atol: float | None = None
    rtol: float | None = None
    tolerance_source: str = ""
    logits_outside: int = 0
    num_logits: int = 0
    reference_is_source: bool | None = None
    skipped_images: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def top1_drop(self) -> float:
        """Reference top-1 minus engine top-1, in percentage points (negative: engine better)."""
        return 100.0 * (self.reference_top1 - self.engine_top1)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document: ``engine.top1`` ... ``num_images`` plus the extras."""
        return {
            "engine": {"path": self.engine, "backend": self.backend, "precision": self.precision,
                       "top1": self.engine_top1, "top5": self.engine_top5},
            "reference": {"path": self.reference, "top1": self.reference_top1,
                          "top5": self.reference_top5,
                          "is_engine_source": self.reference_is_source},
            "top1_agreement": self.top1_agreement,
            "top5_overlap": self.top5_overlap,
            "max_abs_logit_error": self.max_abs_logit_error,
            "logits_outside_tolerance": self.logits_outside,
            "num_logits": self.num_logits,
            "num_images": self.num_images,
            "mean_abs_logit_error": self.mean_abs_logit_error,
            "cosine_similarity": self.cosine_similarity,
            "min_cosine_similarity": self.min_cosine_similarity,
            "nonfinite_logits": self.nonfinite_logits,
            "top1_drop_points": self.top1_drop,
            "per_class": self.per_class,
            "data": self.data,
            "skipped_images": self.skipped_images,
            "seconds": round(self.seconds, 3),
            "thresholds": {"max_top1_drop": self.max_top1_drop,
                           "min_agreement": self.min_agreement,
                           "atol": self.atol, "rtol": self.rtol,
                           "tolerance": self.tolerance_source},
            "passed": self.passed,
            "failures": list(self.failures),
        }

    def summary(self) -> list[str]:
        """The lines ``alexnet-deploy validate`` prints."""
        pct = lambda v: f"{100 * v:6.2f}%"
        lines = [
            f"engine     {self.engine} ({self.backend}, {self.precision})",
            f"reference  {self.reference}",
            f"data       {self.data}: {self.num_images} images"
            + (f" ({self.skipped_images} unreadable, skipped)" if self.skipped_images else ""),
            "              top-1    top-5",
            f"engine     {pct(self.engine_top1)}  {pct(self.engine_top5)}",
            f"reference  {pct(self.reference_top1)}  {pct(self.reference_top5)}",
            f"top-1 drop {self.top1_drop:+.2f} points (limit {self.max_top1_drop:g})",
            (f"agreement  top-1 {pct(self.top1_agreement)} (min {pct(self.min_agreement)}), "
             f"top-5 overlap {pct(self.top5_overlap)}"),
            (f"logits     max |err| {self.max_abs_logit_error:.3g}, mean |err| "
             f"{self.mean_abs_logit_error:.3g}, cosine mean {self.cosine_similarity:.6f} "
             f"min {self.min_cosine_similarity:.6f}, NaN/Inf {self.nonfinite_logits}"),
            (f"tolerance  atol {self.atol:g} rtol {self.rtol:g} ({self.tolerance_source}): "
             f"{self.logits_outside} of {self.num_logits} logits outside"
             if self.atol is not None else
             f"tolerance  {self.tolerance_source} (judged by top-1 drop and agreement; "
             "--atol/--rtol check its logits)"),
        ]
        if self.reference_is_source is False:
            lines.insert(2, "           (not the model the engine was built from: "
                            "--allow-other-reference)")
        drops = sorted((v["engine_top1"] - v["reference_top1"], name)
                       for name, v in self.per_class.items())
        worst = [(d, name) for d, name in drops[:3] if d < 0]
        if worst:
            lines.append("per class  largest drops: " + ", ".join(
                f"{name} {100 * self.per_class[name]['engine_top1']:.1f}% (reference "
                f"{100 * self.per_class[name]['reference_top1']:.1f}%)" for _, name in worst))
        lines.append("PASS" if self.passed else f"FAIL ({len(self.failures)} check"
                     f"{'s' if len(self.failures) > 1 else ''})")
        return lines


class _Accumulator:
    """Running sums of every metric, one batch at a time."""

    def __init__(self, num_classes: int, atol: float | None = None,
                 rtol: float | None = None) -> None:
        self.k = min(TOPK, num_classes)
        self.atol, self.rtol = atol, rtol
        self.outside = 0
        self.n = 0
        self.hits = np.zeros(4, np.int64)  # engine top1, top5, reference top1, top5
        self.agree = 0
        self.overlap = 0.0
        self.max_err = 0.0
        self.sum_err = 0.0
        self.count_err = 0
        self.cos_sum = 0.0
        self.cos_min = 1.0
        self.nonfinite = 0
        self.class_count = np.zeros(num_classes, np.int64)
        self.class_hits = np.zeros((2, num_classes), np.int64)

    def add(self, engine: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> None:
        engine = engine.astype(np.float64)
        reference = reference.astype(np.float64)
        finite = np.isfinite(engine)
        self.nonfinite += int(finite.size - finite.sum())
        top_e, top_r = self._topk(engine), self._topk(reference)
        e1, r1 = top_e[:, 0], top_r[:, 0]
        self.hits += [np.sum(e1 == labels), np.sum(np.any(top_e == labels[:, None], axis=1)),
                      np.sum(r1 == labels), np.sum(np.any(top_r == labels[:, None], axis=1))]
        self.agree += int(np.sum(e1 == r1))
        self.overlap += float(sum(len(set(a) & set(b)) for a, b in zip(top_e, top_r)) / self.k)
        if self.atol is not None:  # Polygraphy's elementwise check: outside both tolerances
            diff = np.abs(engine - reference)
            self.outside += int(np.sum(finite & (diff > self.atol)
                                       & (diff > self.rtol * np.abs(reference))))
        err = np.abs(engine - reference)[finite]
        if err.size:
            self.max_err = max(self.max_err, float(err.max()))
            self.sum_err += float(err.sum())
            self.count_err += err.size
        e = np.where(finite, engine, 0.0)
        norms = np.linalg.norm(e, axis=1) * np.linalg.norm(reference, axis=1)
        dots = np.sum(e * reference, axis=1)
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0),
                       np.all(e == reference, axis=1).astype(np.float64))
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        np.add.at(self.class_count, labels, 1)
        np.add.at(self.class_hits[0], labels, (e1 == labels).astype(np.int64))
        np.add.at(self.class_hits[1], labels, (r1 == labels).astype(np.int64))
        self.n += len(labels)

    def _topk(self, logits: np.ndarray) -> np.ndarray:
        """Indices of the ``k`` largest logits per row, largest first (NaN sorts as largest)."""
        order = np.argsort(-np.nan_to_num(logits, nan=np.inf), axis=1, kind="stable")
        return order[:, :self.k]


def load_reference(path: str | Path, threads: int | None = None
                   ) -> tuple[Callable[[np.ndarray], np.ndarray], PreprocessSpec, list[str],
                              set[str]]:
    """The FP32 reference: ``(logits_fn, preprocessing spec, class names, identity)``.

    A ``.onnx`` runs on ONNX Runtime (CPU, FP32, the graph as exported); anything else is read as
    an alexnet-deploy checkpoint and runs as the single-device PyTorch model. ``identity`` holds
    the sha256 of the file and, for an ``.onnx``, of the checkpoint it was exported from: what
    an engine sidecar's ``source`` is compared with.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":

        proto = load_onnx(path, load_weights=False)
        info = read_model_info(proto)
        check_alexnet_graph(proto, info, f"reference {path}")
        session = cpu_session(path, threads)
        name = session.get_inputs()[0].name

        def run_onnx(batch: np.ndarray) -> np.ndarray:
            return np.asarray(session.run(None, {name: batch})[0], dtype=np.float32)

        return run_onnx, info.preprocess, list(info.classes), \
            {sha256_file(path), info.source_sha256} - {""}

    import torch


    ckpt = load_checkpoint(path)
    model = ckpt.grouped_model()
    if threads:
        torch.set_num_threads(threads)

    def run_torch(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy().astype(np.float32)

    return run_torch, ckpt.preprocess, list(ckpt.classes), {ckpt.sha256}



def validate_engine(engine: str | Path | Engine, reference: str | Path,
                    data: str | Path | ImageDataset, *, max_top1_drop: float = 0.5,
                    min_agreement: float = 0.99, limit: int | None = None,
                    batch_size: int | None = None, threads: int | None = None,
                    atol: float | None = None, rtol: float | None = None,
                    allow_other_reference: bool = False,
                    progress: bool | None = None) -> ValidationResult:
    """Run ``engine`` and its FP32 ``reference`` on the same images and compare them.

    Args:
        engine: an engine folder, or an :class:`~alexnet_deploy.engine.Engine` already loaded.
        reference: the ``.pt`` checkpoint or ``.onnx`` model the engine was built from.
        data: image folder, ``.npz`` (or an open data set) with labels.
        max_top1_drop: largest tolerated top-1 drop, percentage points. Defaults to 0.5.
        min_agreement: smallest tolerated top-1 agreement, fraction. Defaults to 0.99.
        limit: use a seeded random subset of this many images. Defaults to all.
        batch_size: images per batch. Defaults to 32 (or the engine's largest batch if smaller).
        threads: CPU threads for the engine and the reference. Defaults to the backends' choice.
        atol, rtol: logit tolerances (see :data:`LOGIT_TOLERANCE`); either given replaces the
            precision's default pair. Defaults to None (the precision's defaults).
        allow_other_reference: compare with a reference that is not the model the engine was
            built from (the sidecar records its sha256). Defaults to False: a UserError.
        progress: show a progress bar; None shows it only when stderr is a terminal.
            Defaults to None.

    Raises:
        UserError: the engine, reference or data cannot be used, or they do not fit each other.
    """
    from tqdm import tqdm


    if max_top1_drop < 0:
        raise UserError(f"--max-top1-drop must be >= 0 (percentage points), got {max_top1_drop}")
    if not 0.0 <= min_agreement <= 1.0:
        raise UserError(f"--min-agreement is a fraction in 0..1, got {min_agreement}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")

    own_engine = not isinstance(engine, Engine)
    loaded = load_engine(engine, threads=threads) if own_engine else engine
    try:
        sc = loaded.sidecar
        run_reference, ref_spec, ref_classes, identity = load_reference(reference, threads)
        recorded = {sc.model_sha256, sc.checkpoint_sha256} - {""}
        is_source = bool(recorded & identity) if recorded else None
        if is_source is False and not allow_other_reference:
            raise UserError(f"reference {reference} is not the model engine {loaded.path} was "
                            "built from (its sha256 is not the source recorded in "
                            f"{loaded.path}/engine.json): pass that checkpoint or .onnx, or "
                            "--allow-other-reference to compare with another model")
        atol, rtol, tolerance_source = logit_tolerance(sc.precision, atol, rtol)
        if ref_spec.to_dict() != sc.preprocess.to_dict():
            raise UserError(f"reference {reference} preprocesses images differently from engine "
                            f"{loaded.path} ({_spec_diff(ref_spec, sc.preprocess)}): pass the "
                            "checkpoint or model the engine was built from")
        if len(ref_classes) != sc.num_classes:
            raise UserError(f"reference {reference} has {len(ref_classes)} classes, engine "
                            f"{loaded.path} has {sc.num_classes}: they are different models")
        dataset = open_dataset(data)
        to_engine_class = label_map(sc.classes, dataset, model="the engine")
        total = len(dataset) if limit is None else min(limit, len(dataset))
        batch_size = loaded.resolve_batch_size(batch_size)
        skipped = SkippedImages(dataset)
        acc = _Accumulator(sc.num_classes, atol, rtol)
        start = time.perf_counter()
        # disable=None: a bar only on a terminal, never in a redirected log
        with tqdm(total=total, desc="validate", unit="img", leave=False,
                  disable=None if progress is None else not progress) as bar:
            for batch in iter_batches(dataset, sc.preprocess, batch_size, limit=limit,
                                      seed=0 if limit is not None else None, skipped=skipped):
                labels = to_engine_class[batch.labels]
                # the last batch may be smaller than a TensorRT profile's smallest: padded
                acc.add(loaded.infer_padded(batch.images), run_reference(batch.images), labels)
                bar.update(len(labels))
                bar.set_postfix(agree=f"{acc.agree / max(acc.n, 1):.4f}", refresh=False)
        seconds = time.perf_counter() - start
    finally:
        if own_engine:
            loaded.close()
    if acc.n == 0:
        raise UserError(f"data {dataset.source}: no readable images to validate on")
    per_class = {sc.classes[c]: {"num_images": int(acc.class_count[c]),
                                 "engine_top1": float(acc.class_hits[0, c] / acc.class_count[c]),
                                 "reference_top1": float(acc.class_hits[1, c]
                                                         / acc.class_count[c])}
                 for c in np.flatnonzero(acc.class_count)}
    n = acc.n
    result = ValidationResult(
        engine=str(loaded.path), backend=sc.backend, precision=sc.precision,
        reference=str(reference), data=str(dataset.source), num_images=n,
        engine_top1=float(acc.hits[0] / n), engine_top5=float(acc.hits[1] / n),
        reference_top1=float(acc.hits[2] / n), reference_top5=float(acc.hits[3] / n),
        top1_agreement=acc.agree / n, top5_overlap=acc.overlap / n,
        max_abs_logit_error=acc.max_err,
        mean_abs_logit_error=acc.sum_err / max(acc.count_err, 1),
        cosine_similarity=acc.cos_sum / n, min_cosine_similarity=acc.cos_min,
        nonfinite_logits=acc.nonfinite, per_class=per_class, max_top1_drop=max_top1_drop,
        min_agreement=min_agreement, atol=atol, rtol=rtol, tolerance_source=tolerance_source,
        logits_outside=acc.outside, num_logits=n * sc.num_classes,
        reference_is_source=is_source, skipped_images=skipped.count, seconds=seconds)
    result.failures = _failures(result)
    return result


def _failures(r: ValidationResult) -> list[str]:
    failures = []
    # compared in whole images: 0.5 points of 400 images is 2 images, not 2.0000000000000004
    n = r.num_images
    dropped = round((r.reference_top1 - r.engine_top1) * n)
    agreed = round(r.top1_agreement * n)
    if dropped > r.max_top1_drop / 100 * n + 1e-9:
        failures.append(f"top-1 dropped {r.top1_drop:.2f} points (reference "
                        f"{100 * r.reference_top1:.2f}% -> engine {100 * r.engine_top1:.2f}%), "
                        f"more than --max-top1-drop {r.max_top1_drop:g}")
    if agreed < r.min_agreement * n - 1e-9:
        failures.append(f"top-1 agreement {100 * r.top1_agreement:.2f}% is below "
                        f"--min-agreement {100 * r.min_agreement:.2f}%")
    if r.nonfinite_logits:
        failures.append(f"the engine produced {r.nonfinite_logits} NaN/Inf logits")
    if r.logits_outside:
        failures.append(f"{r.logits_outside} of {r.num_logits} logits differ from the reference "
                        f"by more than atol {r.atol:g} and rtol {r.rtol:g} ({r.tolerance_source})"
                        f"; max |err| {r.max_abs_logit_error:.3g}")
    return failures


def _spec_diff(a: PreprocessSpec, b: PreprocessSpec) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k} {da.get(k)} vs {db.get(k)}" for k in sorted(set(da) | set(db))
                     if da.get(k) != db.get(k))


def run_validate(engine: str, reference: str, data: str, *, json_path: str | None = None,
                 **options: Any) -> ValidationResult:
    """What ``alexnet-deploy validate`` does: validate, then write ``--json`` if asked."""

    if json_path:  # checked before the long part
        check_output(json_path, "--json", "json",
                     inputs={"--engine": engine, "--reference": reference, "--data": data})
    result = validate_engine(engine, reference, data, **options)
    if json_path:
        write_json_atomic(json_path, result.to_json())
    return result
