"""Stage 3, ``alexnet-deploy calibrate``: per-tensor activation ranges of an exported model.

Examples::

    alexnet-deploy calibrate --model model.onnx --data ../shared/data/cifar10_train_10k.npz \\
        --method entropy --num-images 512 --out calibration/cifar-entropy.json
    alexnet-deploy calibrate --model model.onnx --data imagenette_train2k/ \\
        --method percentile --percentile 99.99 --out calibration/imagenette-p9999.json

Writes ``NAME.json`` (format ``alexnet-deploy/calibration/1``) and a TensorRT calibration cache
``NAME.cache`` beside it. The build stage reads the JSON through :func:`load_calibration`.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from queue import Full, Queue
from typing import TYPE_CHECKING

import numpy as np

from alexnet_deploy.calibrators import (
    INT8_MAX,
    HistogramCollector,
    NonFiniteActivation,
    make_calibrator,
)
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import (
    check_output,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from alexnet_deploy.metadata import load_onnx, read_model_info
from alexnet_deploy.onnxrt import cpu_session
from alexnet_deploy.preprocess import PreprocessSpec

if TYPE_CHECKING:
    import onnx

FORMAT = "alexnet-deploy/calibration/1"


@dataclass
class Calibration:
    """Activation ranges of one model, as the quantizer reads them.

    Args:
        method: the calibrator that chose the ranges (``entropy``, ``percentile``, ``minmax``,
            ``mse``).
        num_images: how many images were run through the model.
        model_sha256: sha256 of the ``.onnx`` file that was calibrated.
        data_fingerprint: fingerprint of the calibration data (``data.dataset_fingerprint``).
        preprocess: the preprocessing spec the images were read with, as a dict.
        amax: tensor name -> the largest magnitude that maps to +-127 (always > 0).
        options: the method's options and the image selection (``num_images`` asked, ``seed``).
    """

    method: str
    num_images: int
    model_sha256: str
    data_fingerprint: str
    preprocess: dict
    amax: dict[str, float]
    options: dict = field(default_factory=dict)

    def scale(self, name: str) -> float:
        """The symmetric int8 scale of tensor ``name``: ``amax / 127`` (zero point 0)."""
        try:
            return self.amax[name] / INT8_MAX
        except KeyError:
            raise UserError(f"the calibration has no range for tensor {name!r}: it was made for "
                            "another graph; re-run 'alexnet-deploy calibrate' on this model") from None

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "method": self.method,
            "options": self.options,
            "num_images": self.num_images,
            "model_sha256": self.model_sha256,
            "data_fingerprint": self.data_fingerprint,
            "preprocess": self.preprocess,
            "tensors": {name: {"amax": amax, "scale": amax / INT8_MAX}
                        for name, amax in self.amax.items()},
        }

    @classmethod
    def from_dict(cls, d: dict, where: str = "calibration") -> Calibration:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise UserError(f"{where} is not an alexnet-deploy calibration (format {found!r}, "
                            f"expected {FORMAT!r}): re-run 'alexnet-deploy calibrate'")
        try:
            amax = {str(name): float(t["amax"]) for name, t in d["tensors"].items()}
            calibration = cls(method=str(d["method"]), num_images=int(d["num_images"]),
                              model_sha256=str(d["model_sha256"]),
                              data_fingerprint=str(d["data_fingerprint"]),
                              preprocess=dict(d["preprocess"]), amax=amax,
                              options=dict(d.get("options", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where} is corrupt ({type(e).__name__}: {e}): "
                            "re-run 'alexnet-deploy calibrate'") from e
        bad = [n for n, a in amax.items() if not (math.isfinite(a) and a > 0)]
        if bad:
            raise UserError(f"{where} is corrupt: tensor {bad[0]!r} has amax {amax[bad[0]]} "
                            "(must be finite and > 0); re-run 'alexnet-deploy calibrate'")
        return calibration


def load_calibration(path: str | Path, model_sha256: str | None = None) -> Calibration:
    """Read a calibration JSON written by ``alexnet-deploy calibrate``.

    Args:
        path: the ``.json`` file.
        model_sha256: when given, the sha256 of the model about to be quantized; a calibration
            made for another model is refused. Defaults to None (no check).

    Raises:
        UserError: the file is missing, not JSON, not a calibration, or made for another model.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration {path} does not exist: run 'alexnet-deploy calibrate' first")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"calibration {path} is not readable JSON ({e}): "
                        "re-run 'alexnet-deploy calibrate'") from e
    calibration = Calibration.from_dict(d, where=f"calibration {path}")
    if model_sha256 is not None and calibration.model_sha256 != model_sha256:
        raise UserError(f"calibration {path} was made for another model "
                        f"(sha {calibration.model_sha256[:12]}, this model is {model_sha256[:12]}); "
                        "re-run calibrate")
    return calibration



# ---- the TensorRT calibration cache ----

# The newest TensorRT 10 release when this was written. TensorRT 11 removed implicit INT8
# calibration (and with it calibration caches), so a cache only serves TensorRT <= 10.
DEFAULT_TRT_VERSION = "10.16.1"
_TRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11")


def trt_version_number(version: str) -> int:
    """TensorRT's ``NV_TENSORRT_VERSION`` for ``"X.Y.Z"``, the number its cache headers carry.

    TensorRT 10 and later: ``X*10000 + Y*100 + Z`` (10.16.1 -> 101601, as ``NvInferRuntimeBase.h``
    defines it since 10.0); earlier releases: ``X*1000 + Y*100 + Z`` (8.6.1 -> 8601).
    """
    try:
        major, minor, patch = ([int(p) for p in version.split(".")[:3]] + [0, 0])[:3]
    except ValueError:
        raise UserError(f"TensorRT version {version!r} is not like 10.16.1") from None
    if major >= 10 and minor < 100 and patch < 100:
        return major * 10000 + minor * 100 + patch
    if 1 <= major < 10 and minor < 10 and patch < 100:
        return major * 1000 + minor * 100 + patch
    raise UserError(f"TensorRT version {version!r} is not like 10.16.1")


def default_trt_version() -> str:
    """The installed TensorRT's version if it is 10 or older (read from package metadata,
    nothing imported), else :data:`DEFAULT_TRT_VERSION`."""
    return trt_header_version(None)[0]


def trt_header_version(given: str | None) -> tuple[str, str]:
    """``(version, why)``: the TensorRT version a calibration cache header names, and why that
    one: ``given`` (``--trt-version``), else the installed TensorRT 10 or older, else
    :data:`DEFAULT_TRT_VERSION` (TensorRT 11 reads no calibration caches)."""
    from importlib import metadata

    if given:
        return given, "given with --trt-version"
    for dist in _TRT_DISTRIBUTIONS:
        try:
            installed = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        major = installed.split(".")[0]
        if major.isdigit() and int(major) <= 10:
            return installed, f"the installed {dist}"
        return DEFAULT_TRT_VERSION, (f"the newest TensorRT 10: the installed {dist} {installed} "
                                     "reads no calibration caches")
    return DEFAULT_TRT_VERSION, "the newest TensorRT 10: no TensorRT is installed here"


def trt_cache_text(scales: dict[str, float], version: str = DEFAULT_TRT_VERSION) -> str:
    """A TensorRT calibration cache: the header ``TRT-<NV_TENSORRT_VERSION>-EntropyCalibration2``,
    then ``name: <hex>`` per tensor, ``<hex>`` the 8 hex digits of the scale's big-endian
    IEEE-754 float32 bits (scale 1.0 -> ``3f800000``)."""
    lines = [f"TRT-{trt_version_number(version)}-EntropyCalibration2"]
    lines += [f"{name}: {struct.pack('>f', scale).hex()}" for name, scale in scales.items()]
    return "\n".join(lines) + "\n"


def read_trt_cache(path: str | Path) -> tuple[str, dict[str, float]]:
    """``(header, {tensor name: scale})`` of a TensorRT calibration cache."""
    header, *rows = Path(path).read_text().splitlines()
    scales = {}
    for row in rows:
        name, _, bits = row.rpartition(": ")
        try:
            scales[name] = struct.unpack(">f", bytes.fromhex(bits.zfill(8)))[0]
        except (ValueError, struct.error):
            raise UserError(f"{path}: malformed calibration cache line {row!r}") from None
        if not name or len(bits) > 8:
            raise UserError(f"{path}: malformed calibration cache line {row!r}")
    return header, scales


# ---- activations ----

def activation_tensors(model: onnx.ModelProto) -> list[str]:
    """The graph input and every node output that is not a constant, in graph order.

    A tensor is constant when it is an initializer, a ``Constant`` output, or computed from
    constants only: weights and shapes, not activations.
    """
    graph = model.graph
    constant = {t.name for t in graph.initializer}
    names = [v.name for v in graph.input if v.name not in constant]
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (inputs and all(i in constant for i in inputs)):
            constant.update(node.output)
        else:
            names += [o for o in node.output if o]
    return list(dict.fromkeys(names))


def model_input(model: onnx.ModelProto, spec: PreprocessSpec | None = None,
                where: str = "the model") -> tuple[str, int | None]:
    """``(name, fixed batch size or None)`` of the model's one image input.

    With ``spec``, UserError unless its shape is ``[N, 3, crop, crop]`` as the spec says.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"{where} has {len(inputs)} inputs ({[v.name for v in inputs]}); "
                        "calibrate needs a model with one image input, as "
                        "'alexnet-deploy export' writes it")
    dims = [d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim]
    if spec is not None:
        expected = [None, *spec.input_shape]
        if len(dims) != 4 or any(d is not None and d != e for d, e in zip(dims[1:], expected[1:])):
            shown = ", ".join("N" if d is None else str(d) for d in dims)
            raise UserError(f"{where}: input {inputs[0].name!r} has shape [{shown}] but the "
                            f"preprocessing spec stored in it makes [N, 3, {spec.crop}, "
                            f"{spec.crop}]: re-export the model so that the two agree")
    return inputs[0].name, dims[0] if dims else None


def _session(model: onnx.ModelProto, outputs: list[str]):
    """An ONNX Runtime CPU session returning ``outputs``. Graph optimizations are off, so that
    every intermediate tensor exists under its own name."""
    import onnx

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs
                                  if n not in present)
    # as written (no fusions), so every tensor is observed where the quantizer will place Q/DQ
    return cpu_session(augmented, optimize=False, what="the model for calibration")


_DONE = object()


def _background(items: Iterable, depth: int, on_stop: Callable[[], None] | None = None
                ) -> Iterator:
    """``items``, produced by a background thread at most ``depth`` items ahead.

    An exception in the thread is raised here. Closing the generator (leaving the loop early:
    use :func:`contextlib.closing`, so that it happens then and not when the traceback is freed)
    stops the thread, waits for it, and closes ``items``, so a chain of these stops from the end.
    ``on_stop``, if given, is called first: it should cut short the item being produced.
    """
    queue: Queue = Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer, which raises it
            put(e)
        finally:
            if hasattr(items, "close"):
                items.close()

    worker = threading.Thread(target=produce, daemon=True, name="calibrate-prefetch")
    worker.start()
    try:
        while (item := queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        if on_stop is not None:
            on_stop()
        # wait for the producer to finish its item: one still inside ONNX Runtime when the
        # interpreter exits (Ctrl-C) aborts it with "terminate called without an active exception"
        worker.join()


@dataclass
class ActivationStats:
    """One pass over the calibration images: a histogram per float tensor, in graph order."""

    histograms: dict[str, HistogramCollector]
    num_images: int
    seconds: float


def collect_activations(model: onnx.ModelProto, batches: Iterable[np.ndarray], *,
                        tensors: list[str] | None = None, total: int | None = None,
                        progress: bool = True) -> ActivationStats:
    """Run ``batches`` (float32 NCHW) through ``model`` on ONNX Runtime (CPU) and histogram
    every tensor of ``tensors``, batch by batch.

    Args:
        model: the ONNX model, weights loaded.
        batches: preprocessed images, any batch sizes.
        tensors: the tensors to histogram. Defaults to :func:`activation_tensors`; non-float
            ones are left out.
        total: images expected, for the progress bar. Defaults to None (unknown).
        progress: show a progress bar on stderr. Defaults to True.

    Memory stays bounded: each batch's activations are dropped once histogrammed.

    Raises:
        UserError: an activation holds NaN or Inf (the message names the tensor).
    """
    from tqdm import tqdm

    tensors = activation_tensors(model) if tensors is None else tensors
    input_name, fixed_batch = model_input(model)
    session = _session(model, tensors)
    import onnxruntime as ort

    run_options = ort.RunOptions()

    def terminate() -> None:  # stops a model run in flight (Ctrl-C), so closing need not wait
        run_options.terminate = True

    def run(batches: Iterable[np.ndarray]) -> Iterator[tuple[int, list[np.ndarray]]]:
        for batch in batches:
            n = len(batch)
            if not fixed_batch or n == fixed_batch:
                yield n, session.run(tensors, {input_name: batch}, run_options)
                continue
            # a fixed-batch model: pad with copies of the last image, then drop the padding
            pad = np.repeat(batch[-1:], fixed_batch - n, axis=0)
            outputs = session.run(tensors, {input_name: np.concatenate([batch, pad])},
                                  run_options)
            yield n, [v[:n] if v.ndim and v.shape[0] == fixed_batch else v for v in outputs]

    histograms: dict[str, HistogramCollector] = {}
    seen = 0
    start = time.perf_counter()
    # decoding, ONNX Runtime and histogramming overlap: each runs in its own thread, at most one
    # batch ahead, so about three batches of activations are in memory at once
    # disable=None: tqdm stays quiet when stderr is not a terminal (logs, CI)
    with tqdm(total=total, unit="img", desc="calibrate", disable=None if progress else True,
              dynamic_ncols=True, leave=False, file=sys.stderr) as bar, \
            closing(_background(batches, 2)) as decoded, \
            closing(_background(run(decoded), 1, on_stop=terminate)) as results:
        for n, outputs in results:
            _histogram(histograms, tensors, outputs, seen, n)
            seen += n
            bar.update(n)
    return ActivationStats(histograms, seen, time.perf_counter() - start)


def _histogram(histograms: dict[str, HistogramCollector], tensors: list[str],
               outputs: list[np.ndarray], first: int, n: int) -> None:
    """Add one batch's activations (``outputs``, in ``tensors`` order) to ``histograms``;
    images ``first .. first + n - 1`` are named when an activation holds NaN or Inf."""
    for name, value in zip(tensors, outputs):
        if not np.issubdtype(value.dtype, np.floating):
            continue
        hist = histograms.setdefault(name, HistogramCollector())
        try:
            hist.update(value)
        except NonFiniteActivation as e:
            raise UserError(
                f"activation {name!r} holds NaN or Inf ({e}) on calibration images "
                f"{first}..{first + n - 1}: check the model's weights (re-export it) "
                "and the images") from None


# ---- the stage ----

# An all-zero tensor's amax. Symmetric int8 needs a positive scale; any scale quantizes zeros
# exactly; this one (2**-20) is tiny yet keeps x / scale finite for every |x| below 3e32.
ZERO_TENSOR_AMAX = INT8_MAX * 2.0 ** -20


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def calibrate(model: str | Path, data: str | Path, out: str | Path, *,
              method: str = "entropy", percentile: float | None = None, num_images: int = 512,
              batch_size: int = 32, seed: int = 0, trt_version: str | None = None,
              progress: bool = True, say: Callable[[str], None] = _say) -> Calibration:
    """Calibrate ``model`` on ``data`` and write ``out`` (JSON) and the TensorRT cache beside it.

    Args:
        model: the ``.onnx`` written by ``alexnet-deploy export`` (it carries its
            preprocessing spec).
        data: an image folder, an ``.npz`` or ``synthetic:train`` (see :mod:`alexnet_deploy.data`).
        out: ``NAME.json``; the cache goes to ``NAME.cache``.
        method: one of :data:`~alexnet_deploy.calibrators.METHODS`. Defaults to ``"entropy"``.
        percentile: for ``method="percentile"``. Defaults to None (99.99).
        num_images: images to use, a seeded random subset when the data holds more. Fewer are
            used, with a note, when it holds fewer. Defaults to 512.
        batch_size: images per ONNX Runtime call; the result does not depend on it.
            Defaults to 32.
        seed: picks the subset. Defaults to 0.
        trt_version: TensorRT version for the cache header. Defaults to the installed
            TensorRT 10 (or older), else :data:`DEFAULT_TRT_VERSION`.
        progress: show a progress bar. Defaults to True.
        say: where notes go. Defaults to stderr.

    Re-running with the same model, data, method and options reuses ``out`` (and says so).
    """
    import onnx

    from alexnet_deploy import data as datasets  # lazy: data imports torch

    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".json":
        raise UserError(f"--out {out} must end in .json (the TensorRT cache is written beside it "
                        "as NAME.cache)")
    cache_path = out.with_suffix(".cache")
    inputs = {"--model": model, "--data": data}
    # an earlier calibration at --out is reused or replaced below, which says so itself
    check_output(out, "--out", "calibration", inputs=inputs, say=None)
    check_output(cache_path, "--out (its NAME.cache)", "cache", inputs=inputs, say=None)
    if num_images < 1 or batch_size < 1:
        raise UserError(f"--num-images ({num_images}) and --batch-size ({batch_size}) must be >= 1")
    if percentile is not None and method != "percentile":
        raise UserError(f"--percentile is an option of --method percentile, not {method}")
    calibrator = make_calibrator(method, **({} if percentile is None else
                                            {"percentile": percentile}))
    trt_version, trt_why = trt_header_version(trt_version)
    header = trt_version_number(trt_version)

    model = Path(model)
    proto = load_onnx(model, load_weights=False)
    try:
        spec = read_model_info(proto).preprocess
    except UserError as e:
        raise UserError(f"{model}: {e}") from None
    model_input(proto, spec, where=str(model))
    model_sha256 = sha256_file(model)
    dataset = datasets.open_dataset(data)
    fingerprint = datasets.dataset_fingerprint(dataset)
    options = {**calibrator.options(), "num_images": num_images, "seed": seed}

    previous = _previous(out, say)
    if previous is not None and (
            previous.model_sha256, previous.data_fingerprint, previous.method,
            previous.options, previous.preprocess) == (
            model_sha256, fingerprint, method, options, spec.to_dict()):
        write_text_atomic(cache_path, trt_cache_text(_scales(previous), trt_version))
        say(f"reusing {out}: made for the same model, data, method and options "
            "(delete it to recompute)")
        return previous
    if previous is not None:
        say(f"note: replacing {out}, made for another model, data, method or options")

    if len(dataset) < num_images:
        say(f"note: {data} holds {len(dataset)} images, fewer than --num-images {num_images}: "
            f"calibrating on all {len(dataset)}")
    expected = min(num_images, len(dataset))
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(proto, str(model.resolve().parent))
    skipped = datasets.SkippedImages(dataset)
    batches = (b.images for b in datasets.iter_batches(
        dataset, spec, batch_size, limit=num_images, seed=seed, skipped=skipped))
    stats = collect_activations(proto, batches, total=expected, progress=progress)
    if stats.num_images == 0:
        raise UserError(f"no readable images in {data} ({skipped.count} unreadable): "
                        "calibration needs real images of the kind the model will see")

    amax, all_zero = amax_table(stats.histograms, calibrator)
    if all_zero:
        say(f"warning: {len(all_zero)} tensor(s) were all zeros on every calibration image "
            f"({', '.join(all_zero[:5])}{', ...' if len(all_zero) > 5 else ''}): amax set to "
            f"{ZERO_TENSOR_AMAX:.4g} (scale 2^-20); if they are not dead, calibrate on more "
            "varied images")

    calibration = Calibration(method=method, num_images=stats.num_images,
                              model_sha256=model_sha256, data_fingerprint=fingerprint,
                              preprocess=spec.to_dict(), amax=amax, options=options)
    # the cache first: the JSON is what a re-run checks, so it is written last
    write_text_atomic(cache_path, trt_cache_text(_scales(calibration), trt_version))
    write_json_atomic(out, calibration.to_dict())
    seconds = time.perf_counter() - t0
    unreadable = f" ({skipped.count} unreadable skipped)" if skipped.count else ""
    say(f"calibrated {len(amax)} tensors on {stats.num_images} images{unreadable} with {method} in "
        f"{seconds:.1f} s (model runs and histograms {stats.seconds:.1f} s) -> {out}, "
        f"{cache_path.name} (its header TRT-{header} names TensorRT {trt_version}, {trt_why})")
    return calibration


def amax_table(histograms: dict[str, HistogramCollector], calibrator: Callable
               ) -> tuple[dict[str, float], list[str]]:
    """``({tensor: amax}, all-zero tensors)`` from :func:`collect_activations`' histograms: the
    calibrator's amax, :data:`ZERO_TENSOR_AMAX` for a tensor that was zero on every image."""
    amax, all_zero = {}, []
    for name, hist in histograms.items():
        amax[name] = calibrator(hist)
        if amax[name] == 0.0:
            all_zero.append(name)
            amax[name] = ZERO_TENSOR_AMAX
    return amax, all_zero


def _scales(calibration: Calibration) -> dict[str, float]:
    return {name: calibration.scale(name) for name in calibration.amax}


def _previous(out: Path, say: Callable[[str], None]) -> Calibration | None:
    """The calibration already at ``out``, or None (with a note when it is unreadable)."""
    if not out.exists():
        return None
    try:
        return load_calibration(out)
    except UserError as e:
        say(f"note: replacing {out}: {e}")
        return None
