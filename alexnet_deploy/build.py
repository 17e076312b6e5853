"""Stage 4, ``alexnet-deploy build``: an exported ONNX model -> an engine folder.

Examples::

    alexnet-deploy build --model model.onnx --precision fp32 --out engines/fp32
    alexnet-deploy build --model model.onnx --precision int8 \\
        --calibration calibration/cifar-entropy.json --out engines/int8
    alexnet-deploy build --model model.onnx --precision int8 --backend openvino \\
        --calibration calibration/cifar-entropy.json \\
        --max-top1-drop 0.3 --calibration-data ../shared/data/cifar10_train_10k.npz \\
        --out engines/mixed
    alexnet-deploy build --model model.onnx --precision int8 --min-agreement 0.99 \\
        --calibration-data ../shared/data/cifar10_train_10k.npz --input uint8-nhwc \\
        --out engines/int8-99

What a build does, in order:

1. read the model and its metadata (preprocessing spec, class names); refuse a model whose input is
   not ``[N, 3, crop, crop]`` for its own spec;
2. pick the backend (``auto``: TensorRT on a GPU where installed, else OpenVINO, else ONNX Runtime);
3. INT8: load the calibration, refusing one made for another model (sha256 of the ``.onnx``);
   with an accuracy budget (``--min-agreement`` and/or ``--max-top1-drop``), tune on
   ``--calibration-data`` (:func:`tune_int8`): hold out the images training left out when that
   is the model's training data (:func:`tuning_split`), calibrate on others with every method;
   if no all-INT8 graph meets the budget on the held-out images at ``--confidence``, put layers
   in INT8 cheapest first while it holds (:func:`quantize.choose_fp32_layers`, for the two best
   methods, keeping the mix with more INT8 multiply-accumulates), and time the chosen graph
   against the all-INT8 one;
4. make the graph for the precision (``Backend.precision_graph``), apply the backend's exact
   rewrite (``Backend.rewrite_graph``), with ``--input uint8-nhwc`` put the preprocessing
   arithmetic in front (:func:`rewrite.uint8_nhwc_input`), build the artifact, and write the
   folder with its ``engine.json`` sidecar (:mod:`alexnet_deploy.engine`) atomically: nothing is
   left at ``--out`` unless all succeeded.

An accuracy budget the search cannot meet while keeping any layer in INT8 is an error (one line:
what came closest) unless ``best_effort`` (``--best-effort``) builds that closest mix anyway.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alexnet_deploy.backends import get_backend
from alexnet_deploy.backends.tensorrt import default_opt_batch, default_timing_cache
from alexnet_deploy.bench import bench_runners
from alexnet_deploy.calibrate import amax_table, collect_activations, load_calibration, model_input
from alexnet_deploy.calibrators import make_calibrator
from alexnet_deploy.data import (
    dataset_fingerprint,
    holdout_indices,
    iter_batches,
    label_map,
    open_dataset,
)
from alexnet_deploy.engine import (
    BUILD_PRECISIONS,
    EngineSidecar,
    engine_dir_atomic,
    host_info,
    write_sidecar,
)
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import check_output, sha256_file
from alexnet_deploy.metadata import (
    LAYER_PRECISION,
    check_alexnet_graph,
    get_meta,
    load_onnx,
    read_model_info,
)
from alexnet_deploy.model import LAYERS
from alexnet_deploy.onnxrt import cpu_session
from alexnet_deploy.quantize import (
    TARGETS,
    Budget,
    choose_fp32_layers,
    layer_macs,
    required_activations,
    to_int8,
    to_int8_fp16,
    weighted_layers,
)
from alexnet_deploy.rewrite import INPUT_FORMATS, lrn_for_onnxruntime, uint8_nhwc_input

if TYPE_CHECKING:
    import onnx

# The budgeted INT8 search reads up to CALIBRATION_IMAGES + HELD_OUT_IMAGES of --calibration-data
# (a seeded random selection): the first part calibrates, the rest chooses the method and the
# layers. 4,096 held-out images put the 95% bound ~0.25 point under a measured 99% agreement; a
# large model gets fewer (HELD_OUT_BYTES of float32 inputs, ~850 full-size images).
CALIBRATION_IMAGES = 1024
HELD_OUT_IMAGES = 4096
HELD_OUT_BYTES = 512 * 2**20
CALIBRATION_METHODS = ("entropy", "percentile", "mse", "minmax")
SEARCHED_METHODS = 2  # the layer search runs for this many of the best methods (all-INT8)
# With --noise-view SIGMA > 0 the held-out images are judged twice, clean and with seeded
# Gaussian noise of that standard deviation (normalized units), and the budget must hold on both.
# Off by default: as a stand-in for images the model never saw it did not carry over. On a
# model trained on 8,000 CIFAR images, a budget tuned on those images with noise 0.3 measured
# 98.85% on 2,000 images it never saw (CPU placement; docs/results.md). Unseen held-out images
# are what works: train with --holdout and tune on the same data (tuning_split).
STRESS_NOISE = 0.0
SPEED_BATCH = 16  # the speed cost: chosen vs all-INT8 graph, interleaved, on the engine backend
SPEED_SECONDS = 2.0


@dataclass
class BuildResult:
    """What ``build_engine`` wrote: the folder, its sidecar, total artifact bytes, and the
    mixed-precision search (``None`` without ``--max-top1-drop``)."""

    path: Path
    sidecar: EngineSidecar
    size_bytes: int
    mixed: Any = None  # quantize.MixedPrecisionResult
    messages: list[str] = field(default_factory=list)
    tuning: dict[str, Any] | None = None  # what tune_int8 found (also in the sidecar)

    def summary(self) -> list[str]:
        """The lines ``alexnet-deploy build`` prints."""
        sc = self.sidecar
        batch = (f"{sc.min_batch}..{sc.max_batch}" if sc.max_batch is not None else "any")
        if sc.opt_batch is not None:
            batch += f", tuned for {sc.opt_batch}"
        layers = "  ".join(f"{k}={v}" for k, v in sc.layer_precision.items())
        lines = [
            f"engine     {self.path}",
            f"backend    {sc.backend} {sc.backend_version}",
            f"precision  {sc.precision}" + (f" (Q/DQ placement: {sc.placement})"
                                            if sc.placement else ""),
            f"layers     {layers}",
            f"input      {sc.input_name} {_input_text(sc)}, batch {batch}",
            f"size       {self.size_bytes / 2**20:.1f} MiB ({', '.join(sc.artifacts)})",
            f"build time {sc.build_seconds:.1f} s",
        ]
        if sc.timing_cache:
            lines.append(f"cache      {sc.timing_cache} (TensorRT timing cache, read and updated)")
        if self.tuning is not None:
            lines += tuning_lines(self.tuning)
        lines += [f"note       {n}" for n in sc.notes + self.messages]
        return lines


def _input_text(sc: EngineSidecar) -> str:
    c, h, w = sc.input_shape
    return f"uint8 [N, {h}, {w}, {c}] (NHWC pixels)" if sc.input_format == "uint8-nhwc" else \
        f"float32 [N, {c}, {h}, {w}]"


def tuning_lines(t: dict[str, Any]) -> list[str]:
    """The lines ``build`` prints about an accuracy-budgeted INT8 build."""
    held = t["held_out"]
    methods = "  ".join(f"{k} {100 * v['agreement']:.2f}%" for k, v in t["methods"].items())
    source = {"holdout": "the training holdout, unseen by the model",
              "training data": "images the model was trained on",
              "other data": "not the model's training data"}.get(
        t["data"].get("held_out_from"), "")
    lines = [(f"budget     {t['budget']['text']} on {held['num_images']} held-out images "
              f"({source}; {t['data']['calibration_images']} others calibrated)"),
             f"methods    all-INT8 agreement: {methods}; chose {t['method']}"]
    searched = t.get("searched", {})
    if len(searched) > 1:
        lines.append("search     INT8 share of multiply-accumulates, budget met: " + ", ".join(
            f"{k} {100 * v['int8_mac_share']:.0f}% {'yes' if v['fits'] else 'no'}"
            for k, v in searched.items()))
    for label, m in (("all INT8", t["all_int8"]), ("chosen", held)):
        lines.append(f"{label:10s} agreement {100 * m['agreement']:.2f}% (>= "
                     f"{100 * m['agreement_low']:.2f}%), top-1 {t['measure']} "
                     f"{m['drop']:.2f} pt (<= {m['drop_high']:.2f})")
    kept = [k for k, v in t["layer_precision"].items() if v != "int8"]
    lines.append(f"layers     kept in {t['fallback_precision'].upper()}: "
                 f"{', '.join(kept) or 'none'}")
    sp = t.get("speed")
    if sp and sp.get("ratio") is not None:
        lines.append(f"speed cost chosen {sp['chosen_img_s']:.0f} img/s vs all-INT8 "
                     f"{sp['all_int8_img_s']:.0f} img/s at batch {sp['batch']} on {sp['backend']}: "
                     f"x{sp['ratio']:.2f}")
    elif sp:
        lines.append(f"speed cost {sp['note']}")
    if not t["fits"]:
        lines.append("budget     NOT MET (--best-effort): the engine is the closest mix found")
    return lines


def layer_precision(graph: onnx.ModelProto, float_layers: list[str]) -> dict[str, str]:
    """``conv1`` .. ``fc8`` -> precision, as the quantizer recorded it in the graph's metadata
    (``alexnet_deploy.layer_precision``); layers it does not list are FP32."""
    recorded = get_meta(graph, LAYER_PRECISION, {})
    return {name: recorded.get(name, "fp32") for name in float_layers}


def overall_precision(requested: str, layers: dict[str, str]) -> str:
    """``requested``; for INT8, ``mixed`` when some layers stayed FP32 and ``fp32`` when all did
    (a ``--max-top1-drop`` budget that no quantized layer fits)."""
    if requested == "int8" and any(p != "int8" for p in layers.values()):
        return "mixed" if "int8" in layers.values() else "fp32"
    return requested


def build_engine(model_path: str | Path, precision: str, out: str | Path, *,
                 calibration: str | Path | None = None, backend: str = "auto",
                 max_batch: int = 64, max_top1_drop: float | None = None,
                 calibration_data: str | None = None, threads: int | None = None,
                 progress: bool = True, min_batch: int = 1, opt_batch: int | None = None,
                 timing_cache: str | Path | None | bool = True,
                 int8_fallback: str | None = None, min_agreement: float | None = None,
                 confidence: float = 0.95, best_effort: bool = False,
                 placement: str | None = None, input_format: str = "float32-nchw",
                 noise_view: float = STRESS_NOISE) -> BuildResult:
    """Build an engine folder from an exported model.

    Args:
        model_path: the ``.onnx`` written by ``alexnet-deploy export``.
        precision: ``fp32``, ``fp16`` or ``int8``.
        out: the engine folder to write (replaced if it is an earlier engine).
        calibration: the calibration ``.json`` made for this model (INT8: required without an
            accuracy budget; with one, it fixes the method instead of the search choosing).
        backend: ``auto``, ``onnxruntime``, ``openvino`` or ``tensorrt``. Defaults to ``auto``.
        max_batch: largest batch of a TensorRT engine's optimization profile (CPU engines take
            any batch). Defaults to 64.
        max_top1_drop: INT8 only: top-1 budget in percentage points (accuracy when the data's
            classes are the model's, else disagreement with FP32). Defaults to None.
        calibration_data: images (folder / ``.npz``) the accuracy budget is tuned on.
        threads: CPU threads for the build (ONNX Runtime checks the graph loads). Defaults to
            the backend's choice.
        progress: show a progress bar while reading search images. Defaults to True.
        min_batch: smallest batch of a TensorRT engine's profile. Defaults to 1.
        opt_batch: the batch a TensorRT profile is tuned for. Defaults to the power of two
            nearest the geometric mean of ``min_batch`` and ``max_batch`` (1..64 -> 8; see
            :func:`~alexnet_deploy.backends.tensorrt.default_opt_batch`).
        timing_cache: TensorRT timing cache file, read and updated; True for the default
            (``~/.cache/alexnet-deploy/tensorrt-timing.cache``), False or None for none.
            Defaults to True.
        int8_fallback: INT8 only: the precision of what is not quantized, ``fp32`` or ``fp16``
            (TensorRT only). Defaults to the backend's (TensorRT ``fp16``, CPU backends
            ``fp32``).
        min_agreement: INT8 only: top-1 agreement with FP32 (0..1) the engine must keep on
            held-out images. Defaults to None.
        confidence: the budget must hold at the pessimistic end of this one-sided confidence
            interval (0.5: the measured value). Defaults to 0.95.
        best_effort: build the closest mix when the budget cannot be met, instead of failing.
            Defaults to False.
        placement: INT8 Q/DQ placement (``cpu`` or ``tensorrt``) instead of the backend's own
            (e.g. the TensorRT placement simulated on ONNX Runtime). Defaults to None.
        input_format: ``float32-nchw`` (preprocessed images) or ``uint8-nhwc`` (resized,
            cropped RGB pixels; scaling, mean/std and layout run in the graph). Defaults to
            ``float32-nchw``.
        noise_view: with a budget, also judge the held-out images with Gaussian noise of this
            standard deviation added (normalized units); 0 judges clean images only. Defaults to
            :data:`STRESS_NOISE` (0).

    Raises:
        UserError: a bad option, a model or calibration that does not fit, a backend that is
            unknown or not installed, or a backend that fails to build.
    """

    if precision not in BUILD_PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: choose one of "
                        f"{', '.join(BUILD_PRECISIONS)}")
    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {max_batch}")
    if not 1 <= min_batch <= max_batch:
        raise UserError(f"--min-batch must be between 1 and --max-batch ({max_batch}), got "
                        f"{min_batch}")
    if opt_batch is not None and not min_batch <= opt_batch <= max_batch:
        raise UserError(f"--opt-batch must be between --min-batch ({min_batch}) and "
                        f"--max-batch ({max_batch}), got {opt_batch}")
    if int8_fallback not in (None, "fp32", "fp16"):
        raise UserError(f"--int8-fallback must be fp32 or fp16, got {int8_fallback!r}")
    if int8_fallback is not None and precision != "int8":
        raise UserError("--int8-fallback sets what an INT8 engine does not quantize: use it "
                        "with --precision int8")
    if input_format not in INPUT_FORMATS:
        raise UserError(f"--input {input_format!r}: choose one of {', '.join(INPUT_FORMATS)}")
    if placement is not None and (placement not in TARGETS or precision != "int8"):
        raise UserError(f"--placement {placement!r}: choose one of {', '.join(TARGETS)}, with "
                        "--precision int8")
    budget = None
    if max_top1_drop is not None or min_agreement is not None:
        if precision != "int8":
            raise UserError("--min-agreement / --max-top1-drop choose how an INT8 engine is "
                            "quantized: use them with --precision int8")
        budget = Budget(min_agreement, max_top1_drop, confidence)
        if not calibration_data:
            raise UserError("an accuracy budget needs --calibration-data PATH (images to "
                            "calibrate and measure on, like those the engine will see)")
    if precision == "int8" and calibration is None and budget is None:
        raise UserError("INT8 needs --calibration FILE (from 'alexnet-deploy calibrate' on this "
                        "model), or an accuracy budget (--min-agreement 0.99 "
                        "--calibration-data PATH) to calibrate and tune for")
    out = check_output(out, "--out", "engine", inputs={
        "--model": model_path, "--calibration": calibration,
        "--calibration-data": calibration_data})
    messages: list[str] = []
    if calibration is not None and precision != "int8":
        messages.append(f"--calibration is only used by INT8 builds; ignored for {precision}")
        calibration = None

    engine_backend = get_backend(backend)  # before the slow part: fail fast when not installed
    if int8_fallback == "fp16" and engine_backend.name != "tensorrt":
        raise UserError(f"--int8-fallback fp16 is a TensorRT setting; {engine_backend.name} runs "
                        "FP16 through casts on the CPU: use fp32 (the default) there")
    fallback = int8_fallback or engine_backend.default_int8_fallback
    model_path = Path(model_path)
    model = load_onnx(model_path)
    info = read_model_info(model)
    check_alexnet_graph(model, info, str(model_path))
    spec = info.preprocess
    input_name, _ = model_input(model, spec, where=str(model_path))
    model_sha = sha256_file(model_path)

    start = time.perf_counter()
    cal = None
    if calibration is not None:
        cal = load_calibration(calibration, model_sha256=model_sha)
    found = {layer.name for layer in weighted_layers(model)}
    layers = [name for name in LAYERS if name in found]
    keep_fp32: list[str] = []
    mixed = tuning = None
    target = placement or engine_backend.qdq_target
    if budget is not None:
        if not noise_view >= 0:
            raise UserError(f"--noise-view must be >= 0, got {noise_view}")
        tuning, cal, mixed = tune_int8(model, cal, calibration_data, spec, info.classes, budget,
                                       target, progress, noise_view, info.training_data,
                                       fallback)
        if tuning["data"]["held_out_from"] == "training data":
            messages.append(f"--calibration-data {calibration_data} is the data the model was "
                            "trained on and training held none of it out: the budget is "
                            "measured on images the model has fitted, which flatters INT8 "
                            "(train with --holdout N, or tune on other images)")
        keep_fp32 = list(mixed.fp32_layers)
        if not mixed.fits:
            closest = ", ".join(mixed.closest or []) or "none"
            m = mixed.closest_measure
            text = (f"the budget ({budget.describe()}) cannot be met with any layer in INT8 on "
                    f"{m.num_images} held-out images of {calibration_data}; closest: "
                    f"{tuning['method']} calibration with {closest} kept in "
                    f"{fallback.upper()}, agreement "
                    f"{100 * m.agreement:.2f}% (>= {100 * m.agreement_low:.2f}%), top-1 "
                    f"{mixed.measure} {m.drop:.2f} pt (<= {m.drop_high:.2f})")
            if not best_effort:
                raise UserError(text + ": loosen the budget, build FP16/FP32, or pass "
                                "--best-effort to build that mix")
            messages.append(text + " (built with --best-effort)")
            keep_fp32 = list(mixed.closest or [])
            tuning["fits"] = False
            tuning["held_out"] = m.to_dict()
    make = to_int8_fp16 if fallback == "fp16" else to_int8
    if precision == "int8" and target != engine_backend.qdq_target:
        graph = make(model, cal, target=target, keep_fp32=tuple(keep_fp32))
    else:
        graph = engine_backend.precision_graph(model, precision, cal, tuple(keep_fp32),
                                               fallback)
    per_layer = layer_precision(graph, layers) if precision != "fp32" else \
        {name: "fp32" for name in layers}
    if tuning is not None:
        tuning["layer_precision"] = per_layer
        speed_images = tuning.pop("_held_out")[:64]
        tuning["speed"] = (_speed_cost(engine_backend, graph, make(model, cal, target=target),
                                       speed_images, max_batch, threads)
                           if keep_fp32 else {"note": "none: every layer is INT8"})

    graph = engine_backend.rewrite_graph(graph)
    if input_format == "uint8-nhwc":
        graph = uint8_nhwc_input(graph, spec.mean, spec.std)
    profile: dict[str, Any] = {}
    if engine_backend.fixed_batch_range:  # an optimization profile (TensorRT)

        cache = default_timing_cache() if timing_cache is True else (timing_cache or None)
        profile = {"min_batch": min_batch, "timing_cache": cache, "say": messages.append,
                   "opt_batch": (default_opt_batch(min_batch, max_batch) if opt_batch is None
                                 else opt_batch)}
    elif min_batch != 1 or opt_batch is not None:
        messages.append(f"--min-batch/--opt-batch shape TensorRT profiles; {engine_backend.name} "
                        "engines take any batch: ignored")
    with engine_dir_atomic(out) as tmp:
        files = engine_backend.build(graph, tmp, max_batch=max_batch, threads=threads, **profile)
        artifacts = {name: sha256_file(tmp / name) for name in files}
        size = sum((tmp / name).stat().st_size for name in files)
        sidecar = EngineSidecar(
            backend=engine_backend.name, backend_version=engine_backend.version(),
            precision=overall_precision(precision, per_layer), layer_precision=per_layer,
            artifacts=artifacts, preprocess=spec, classes=list(info.classes),
            input_shape=spec.input_shape, input_name=input_name,
            min_batch=profile.get("min_batch", 1),
            max_batch=max_batch if engine_backend.fixed_batch_range else None,
            opt_batch=profile.get("opt_batch"),
            timing_cache=(str(profile["timing_cache"]) if profile.get("timing_cache")
                          else None),
            placement=target if precision == "int8" else None,
            model_sha256=model_sha, calibration_sha256=(sha256_file(calibration)
                                                        if calibration is not None else None),
            checkpoint_sha256=info.source_sha256,
            build_seconds=time.perf_counter() - start,
            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            host=host_info(**engine_backend.device_info()),
            notes=engine_backend.notes(precision) + (
                [("INT8 with FP16 elsewhere: what is not quantized runs in FP16, LRN and "
                  "softmax in FP32")] if precision == "int8" and fallback == "fp16" else []),
            input_format=input_format,
            tuning=tuning,
        )
        write_sidecar(tmp, sidecar)
    return BuildResult(path=out, sidecar=sidecar, size_bytes=size, mixed=mixed,
                       messages=messages, tuning=tuning)


def tuning_split(n: int, fingerprint: str, training_data: dict[str, Any], n_cal: int,
                 held_cap: int) -> tuple[Any, Any, str]:
    """``(calibration positions, held-out positions, source)`` in a data set of ``n`` images
    whose :func:`~alexnet_deploy.data.dataset_fingerprint` is ``fingerprint``, for the budget.

    When the data set is the model's training data (same fingerprint as the exported
    ``training_data`` record) and training held images out, the held-out part is exactly those
    (at most ``held_cap``, a seeded draw of them) and calibration draws from the rest. Otherwise
    one seeded permutation gives ``n_cal`` calibration images, then up to ``held_cap`` held out;
    a set too small for both gives calibration a third. ``source``: ``"holdout"``,
    ``"training data"`` (the model's, none held out: the budget flatters INT8) or
    ``"other data"`` (not the training data, as far as the model's metadata says).
    """
    import numpy as np


    rng = np.random.default_rng(0)
    trained_on = bool(training_data) and training_data.get("fingerprint") == fingerprint
    holdout = int(training_data.get("holdout") or 0) if trained_on else 0
    if holdout > 0 and training_data.get("images") in (None, n):
        held = holdout_indices(n, holdout, int(training_data.get("holdout_seed") or 0))
        if len(held) > held_cap:
            held = np.sort(rng.choice(held, size=held_cap, replace=False))
        rest = np.setdiff1d(np.arange(n), held)
        cal = np.sort(rng.choice(rest, size=min(n_cal, len(rest)), replace=False))
        return cal, held, "holdout"
    if n_cal and n < n_cal + held_cap:
        n_cal = min(n_cal, n // 3)
    order = rng.permutation(n)
    return (np.sort(order[:n_cal]), np.sort(order[n_cal:n_cal + held_cap]),
            "training data" if trained_on else "other data")


def read_images(dataset: Any, spec: Any, indices: Any, progress: bool, what: str
                 ) -> tuple[Any, Any]:
    """``(images, labels)``: the preprocessed images at ``indices`` (unreadable ones left
    out)."""
    import numpy as np
    from tqdm import tqdm


    images, labels = [], []
    # disable=None: quiet when stderr is not a terminal (logs, CI)
    with tqdm(total=len(indices), desc=what, unit="img",
              disable=None if progress else True, leave=False) as bar:
        for batch in iter_batches(dataset, spec, batch_size=64, indices=indices):
            images.append(batch.images)
            labels.append(batch.labels)
            bar.update(len(batch.labels))
    if not images:
        return np.zeros((0, *spec.input_shape), np.float32), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels)


def tune_int8(model: onnx.ModelProto, calibration: Any, data: str, spec: Any,
              classes: list[str], budget: Any, target: str, progress: bool = True,
              noise_view: float = STRESS_NOISE, training_data: dict[str, Any] | None = None,
              fallback: str = "fp32") -> tuple[dict[str, Any], Any, Any]:
    """Choose the calibration and the layers kept in FP32 that meet ``budget`` on held-out
    images of ``data``; every graph runs on ONNX Runtime, whatever the engine's backend.

    The images are split by :func:`tuning_split`: held out are the images training left out
    when ``data`` is the model's training data (``training_data``, the exported record) and it
    held some out, else a seeded draw. Without ``calibration``: :data:`CALIBRATION_IMAGES` others
    are calibrated with each of :data:`CALIBRATION_METHODS` (one pass, one histogram per
    tensor), and the method whose all-INT8 graph has the best held-out agreement (then smallest
    top-1 drop) wins. With ``calibration`` the method is fixed and nothing else is read. Every
    candidate graph is the engine's kind: layers left out of INT8 in ``fallback`` precision
    (``fp16``: :func:`~alexnet_deploy.quantize.to_int8_fp16`, TensorRT's default). Labels count only when the data's classes are the model's;
    otherwise drops are disagreement with FP32. With ``noise_view`` > 0 every held-out image is
    also judged with seeded Gaussian noise of that deviation added, and the budget must hold on
    both views (:class:`~alexnet_deploy.quantize.Budget` ``views``).

    Returns:
        ``(tuning, calibration, mixed)``: the sidecar's ``tuning`` record (plus
        ``_held_out``, the held-out images, which the caller pops), the chosen amax table (a
        :class:`~alexnet_deploy.calibrate.Calibration` or mapping) and the
        :class:`~alexnet_deploy.quantize.MixedPrecisionResult`.
    """
    import dataclasses

    import numpy as np


    start = time.perf_counter()
    c, h, w = spec.input_shape
    held_cap = max(64, min(HELD_OUT_IMAGES, HELD_OUT_BYTES // (4 * c * h * w)))
    dataset = open_dataset(data)
    fingerprint = dataset_fingerprint(dataset)  # hashes every image of an .npz: once
    cal_at, held_at, source = tuning_split(len(dataset), fingerprint, training_data or {},
                                           0 if calibration is not None else CALIBRATION_IMAGES,
                                           held_cap)
    images, _ = read_images(dataset, spec, cal_at, progress, "calibration images")
    held, held_labels = read_images(dataset, spec, held_at, progress, "held-out images")
    n_cal = len(images)
    if len(held) < 64 or (calibration is None and n_cal < 64):
        raise UserError(f"--calibration-data {data}: {n_cal + len(held)} readable images; an "
                        "accuracy budget needs at least 128 (a calibration and a held-out part "
                        "of 64 or more each)")
    views = ["clean"]
    if noise_view > 0:
        noise = np.random.default_rng(0).standard_normal(held.shape, dtype=np.float32)
        held = np.concatenate([held, held + np.float32(noise_view) * noise])
        held_labels = np.concatenate([held_labels, held_labels])
        views.append(f"gaussian noise {noise_view:g}")
    budget = dataclasses.replace(budget, views=len(views))
    try:  # accuracy against the labels where the data has the model's classes
        use_labels = label_map(classes, dataset)[held_labels]
    except UserError:
        use_labels = None
    reference = search_logits(model, held)
    candidates: dict[str, Any] = {}
    if calibration is not None:
        candidates[getattr(calibration, "method", "file")] = calibration
    else:
        tensors = list(dict.fromkeys(required_activations(model, "cpu")
                                     + required_activations(model, "tensorrt")))
        stats = collect_activations(model, (images[i:i + 64] for i in range(0, n_cal, 64)),
                                    tensors=tensors, total=n_cal, progress=progress)
        for method in CALIBRATION_METHODS:
            candidates[method] = amax_table(stats.histograms, make_calibrator(method))[0]
    make = to_int8_fp16 if fallback == "fp16" else to_int8
    scores = {method: budget.measure(reference, search_logits(make(model, cal, target), held),
                                     use_labels)
              for method, cal in candidates.items()}
    # best held-out agreement, then smallest drop; ties keep CALIBRATION_METHODS' order
    ranked = sorted(scores, key=lambda k: (-scores[k].agreement, scores[k].drop))
    # When all-INT8 misses, the layer search runs for the SEARCHED_METHODS best methods and the
    # mix with the most INT8 multiply-accumulates wins (all-INT8 agreement does not say whose
    # layers are cheapest alone: on the CIFAR model entropy and percentile tied at 98.45%, and
    # percentile's conv4 changed 3 held-out answers where entropy's changed 8).
    macs = layer_macs(model)
    searched: dict[str, Any] = {}
    for name in ranked[:1 if budget.fits(scores[ranked[0]]) else SEARCHED_METHODS]:
        searched[name] = choose_fp32_layers(model, candidates[name], held, budget, target=target,
                                            labels=use_labels, run=search_logits,
                                            reference=reference, quantizer=make)

    def int8_share(k: str) -> float:
        return sum(v for n, v in macs.items() if n not in searched[k].fp32_layers) / \
            sum(macs.values())

    method = max(searched, key=lambda k: (searched[k].fits, int8_share(k),
                                          searched[k].final.agreement_low))
    chosen, mixed = candidates[method], searched[method]
    tuning = {
        "budget": {"min_agreement": budget.min_agreement, "max_top1_drop": budget.max_top1_drop,
                   "confidence": budget.confidence, "text": budget.describe()},
        "data": {"path": str(data), "fingerprint": fingerprint,
                 "calibration_images": n_cal, "held_out_images": len(held) // len(views),
                 "held_out_from": source, "seed": 0, "views": views},
        "placement": target,
        "measure": mixed.measure,
        "methods": {k: v.to_dict() for k, v in scores.items()},
        "searched": {k: {"fp32_layers": v.fp32_layers, "fits": v.fits,
                         "int8_mac_share": round(int8_share(k), 4)}
                     for k, v in searched.items()},
        "method": method,
        "calibration": {k: float(v) for k, v in getattr(chosen, "amax", chosen).items()},
        "all_int8": mixed.all_int8.to_dict(),
        "held_out": mixed.final.to_dict(),
        "layers": [{"name": r.name, "drop_alone": round(r.drop_alone, 4),
                    "gain_if_fp32": round(r.gain_if_fp32, 4)} for r in mixed.layers],
        "fallback_precision": fallback,  # what the searched graphs ran kept layers in
        "fits": mixed.fits,
        "seconds": round(time.perf_counter() - start, 1),
        "_held_out": held,
    }
    return tuning, chosen, mixed


def _speed_cost(backend: Any, chosen: onnx.ModelProto, all_int8: onnx.ModelProto, images: Any,
                max_batch: int, threads: int | None) -> dict[str, Any]:
    """Throughput of the chosen mix against the all-INT8 graph: both built by ``backend`` into
    temporary folders and timed interleaved for :data:`SPEED_SECONDS` each at batch
    :data:`SPEED_BATCH` (the engine's own backend, so the cost is the one it will pay)."""
    import tempfile
    import types


    batch = min(SPEED_BATCH, max_batch)
    meta = types.SimpleNamespace(input_name="input", input_shape=tuple(images.shape[1:]),
                                 min_batch=1, precision="int8",
                                 max_batch=max_batch if backend.fixed_batch_range else None)
    runners = []
    try:
        with tempfile.TemporaryDirectory(prefix="alexnet-speed-") as tmp:
            for name, graph in (("chosen", chosen), ("all-int8", all_int8)):
                folder = Path(tmp) / name
                folder.mkdir()
                backend.build(backend.rewrite_graph(graph), folder, max_batch=max_batch,
                              threads=threads)
                runners.append((name, backend.load(folder, meta, threads=threads)))
            results = bench_runners(runners, batch_sizes=[batch], duration=SPEED_SECONDS,
                                    warmup=0.3, data=images, progress=False,
                                    warn=lambda _: None)
    except UserError as e:  # e.g. a GPU backend on a machine without one
        return {"backend": backend.name, "note": f"not measured ({e})"}
    finally:
        for _, runner in runners:
            runner.close()
    chosen_ips, int8_ips = (r.at(batch).throughput for r in results)
    return {"backend": backend.name, "batch": batch, "seconds_each": SPEED_SECONDS,
            "chosen_img_s": round(chosen_ips, 1), "all_int8_img_s": round(int8_ips, 1),
            "ratio": round(chosen_ips / int8_ips, 3),
            "note": "timed during the build: other load on the machine skews it"}


def search_logits(graph: onnx.ModelProto, images: Any, batch_size: int = 64) -> Any:
    """Logits of one candidate graph in the search, on ONNX Runtime with its fast exact LRN
    form (the search runs the model about twice per layer; native LRN would double its time)."""
    import numpy as np


    session = cpu_session(lrn_for_onnxruntime(graph).SerializeToString())
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])
