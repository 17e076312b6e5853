"""Stage 4, ``alexnet-deploy build``: an exported ONNX model -> an engine folder.

Examples::

    alexnet-deploy build --model model.onnx --precision fp32 --out engines/fp32
    alexnet-deploy build --model model.onnx --precision int8 \\
        --calibration calibration/cifar-entropy.json --out engines/int8
    alexnet-deploy build --model model.onnx --precision int8 --backend openvino \\
        --calibration calibration/cifar-entropy.json \\
        --max-top1-drop 0.3 --calibration-data ../shared/data/cifar10_train_10k.npz \\
        --out engines/mixed

What a build does, in order:

1. read the model and its metadata (preprocessing spec, class names); refuse a model whose input is
   not ``[N, 3, crop, crop]`` for its own spec;
2. pick the backend (``auto``: TensorRT on a GPU where installed, else OpenVINO, else ONNX Runtime);
3. INT8: load the calibration, refusing one made for another model (sha256 of the ``.onnx``);
   with ``--max-top1-drop``, measure per-layer sensitivity on ``--calibration-data`` and keep the
   costliest layers in FP32 until the measured top-1 drop fits (:func:`quantize.choose_fp32_layers`);
4. make the graph for the precision (``Backend.precision_graph``), apply the backend's exact
   rewrite (``Backend.rewrite_graph``), build the artifact, and write the folder with its ``engine.json`` sidecar
   (:mod:`alexnet_deploy.engine`) atomically: nothing is left at ``--out`` unless all succeeded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alexnet_deploy.engine import BUILD_PRECISIONS
from alexnet_deploy.errors import UserError
from alexnet_deploy.metadata import LAYER_PRECISION, get_meta

if TYPE_CHECKING:
    import onnx

    from alexnet_deploy.engine import EngineSidecar

# images the --max-top1-drop sensitivity search runs (it runs the model ~2 x layers + a few times)
SENSITIVITY_IMAGES = 512


@dataclass
class BuildResult:
    """What ``build_engine`` wrote: the folder, its sidecar, total artifact bytes, and the
    mixed-precision search (``None`` without ``--max-top1-drop``)."""

    path: Path
    sidecar: EngineSidecar
    size_bytes: int
    mixed: Any = None  # quantize.MixedPrecisionResult
    messages: list[str] = field(default_factory=list)

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
            f"input      {sc.input_name} [N, {', '.join(map(str, sc.input_shape))}], batch {batch}",
            f"size       {self.size_bytes / 2**20:.1f} MiB ({', '.join(sc.artifacts)})",
            f"build time {sc.build_seconds:.1f} s",
        ]
        if sc.timing_cache:
            lines.append(f"cache      {sc.timing_cache} (TensorRT timing cache, read and updated)")
        if self.mixed is not None:
            m = self.mixed
            lines.append(f"mixed      budget {m.budget:g} pt, measured {m.measure} "
                         f"{m.final_drop:.2f} pt on {m.num_images} images (all-INT8 "
                         f"{m.all_int8_drop:.2f} pt); kept FP32: "
                         f"{', '.join(m.fp32_layers) or 'none'}")
        lines += [f"note       {n}" for n in sc.notes + self.messages]
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
                 int8_fallback: str | None = None) -> BuildResult:
    """Build an engine folder from an exported model.

    Args:
        model_path: the ``.onnx`` written by ``alexnet-deploy export``.
        precision: ``fp32``, ``fp16`` or ``int8``.
        out: the engine folder to write (replaced if it is an earlier engine).
        calibration: the calibration ``.json`` (required for INT8, made for this model).
        backend: ``auto``, ``onnxruntime``, ``openvino`` or ``tensorrt``. Defaults to ``auto``.
        max_batch: largest batch of a TensorRT engine's optimization profile (CPU engines take
            any batch). Defaults to 64.
        max_top1_drop: INT8 only: top-1 budget in percentage points; layers are kept in FP32
            until the drop measured on ``calibration_data`` fits. Defaults to None (all INT8).
        calibration_data: images (folder / ``.npz``) for the ``max_top1_drop`` search.
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

    Raises:
        UserError: a bad option, a model or calibration that does not fit, a backend that is
            unknown or not installed, or a backend that fails to build.
    """
    from alexnet_deploy.backends import get_backend
    from alexnet_deploy.calibrate import load_calibration, model_input
    from alexnet_deploy.engine import EngineSidecar, engine_dir_atomic, host_info, write_sidecar
    from alexnet_deploy.fileio import check_output, sha256_file
    from alexnet_deploy.metadata import check_alexnet_graph, load_onnx, read_model_info
    from alexnet_deploy.model import LAYERS
    from alexnet_deploy.quantize import weighted_layers

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
    if precision == "int8" and calibration is None:
        raise UserError("INT8 needs --calibration FILE (from 'alexnet-deploy calibrate' on this "
                        "model)")
    if max_top1_drop is not None:
        if precision != "int8":
            raise UserError("--max-top1-drop chooses which layers stay FP32 in an INT8 engine: "
                            "use it with --precision int8")
        if max_top1_drop < 0:
            raise UserError(f"--max-top1-drop must be >= 0, got {max_top1_drop}")
        if not calibration_data:
            raise UserError("--max-top1-drop needs --calibration-data PATH (images to measure "
                            "the drop on)")
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
    mixed = None
    if max_top1_drop is not None:
        mixed = _choose_fp32_layers(model, cal, calibration_data, spec, info.classes,
                                    max_top1_drop, engine_backend.qdq_target, progress)
        keep_fp32 = list(mixed.fp32_layers)
    graph = engine_backend.precision_graph(model, precision, cal, tuple(keep_fp32), fallback)
    per_layer = layer_precision(graph, layers) if precision != "fp32" else \
        {name: "fp32" for name in layers}

    graph = engine_backend.rewrite_graph(graph)
    profile: dict[str, Any] = {}
    if engine_backend.fixed_batch_range:  # an optimization profile (TensorRT)
        from alexnet_deploy.backends.tensorrt import default_opt_batch, default_timing_cache

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
            placement=engine_backend.qdq_target if precision == "int8" else None,
            model_sha256=model_sha, calibration_sha256=(sha256_file(calibration)
                                                        if calibration is not None else None),
            checkpoint_sha256=info.source_sha256,
            build_seconds=time.perf_counter() - start,
            built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            host=host_info(**engine_backend.device_info()),
            notes=engine_backend.notes(precision) + (
                [("INT8 with FP16 elsewhere: what is not quantized runs in FP16, LRN and "
                  "softmax in FP32")] if precision == "int8" and fallback == "fp16" else []),
        )
        write_sidecar(tmp, sidecar)
    return BuildResult(path=out, sidecar=sidecar, size_bytes=size, mixed=mixed,
                       messages=messages)


def _choose_fp32_layers(model: onnx.ModelProto, calibration: Any, data: str, spec: Any,
                        classes: list[str], budget: float, target: str, progress: bool) -> Any:
    """Read up to :data:`SENSITIVITY_IMAGES` images of ``data`` and run the budgeted search
    (on ONNX Runtime, whatever the engine's backend). Labels count only when the data's classes are the model's; otherwise the
    search measures top-1 disagreement with FP32, an upper bound on the accuracy drop."""
    import numpy as np
    from tqdm import tqdm

    from alexnet_deploy.data import iter_batches, open_dataset
    from alexnet_deploy.quantize import choose_fp32_layers

    dataset = open_dataset(data)
    limit = min(SENSITIVITY_IMAGES, len(dataset))
    images, labels = [], []
    with tqdm(total=limit, desc="search images", unit="img", disable=None if progress else True,
              leave=False) as bar:
        for batch in iter_batches(dataset, spec, batch_size=64, limit=limit, seed=0):
            images.append(batch.images)
            labels.append(batch.labels)
            bar.update(len(batch.labels))
    if not images:
        raise UserError(f"--calibration-data {data}: no readable images")
    same_classes = list(dataset.class_names) == list(classes)
    return choose_fp32_layers(model, calibration, np.concatenate(images), budget,
                              target=target, run=_search_logits,
                              labels=np.concatenate(labels) if same_classes else None)


def _search_logits(graph: onnx.ModelProto, images: Any, batch_size: int = 64) -> Any:
    """Logits of one candidate graph in the search, on ONNX Runtime with its fast exact LRN
    form (the search runs the model about twice per layer; native LRN would double its time)."""
    import numpy as np

    from alexnet_deploy.onnxrt import cpu_session
    from alexnet_deploy.rewrite import lrn_for_onnxruntime

    session = cpu_session(lrn_for_onnxruntime(graph).SerializeToString())
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])
