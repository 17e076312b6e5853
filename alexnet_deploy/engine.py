"""The engine format: the one definition of what ``alexnet-deploy build`` writes and loads.

An engine is a folder::

    engines/NAME/
        model.onnx                 ONNX Runtime: the precision graph it runs
        model.xml + model.bin      OpenVINO: the converted model (IR, ``openvino.save_model``)
        model.engine               TensorRT: the serialized plan
        engine.json                the sidecar, :class:`EngineSidecar`

``engine.json`` (``format: "alexnet-deploy/engine/1"``) records what the engine is and where it came
from, so that it can be checked before it is run and compared with its reference afterwards::

    {
      "format": "alexnet-deploy/engine/1",
      "alexnet_deploy_version": "0.1.0",
      "backend": {"name": "onnxruntime", "version": "1.32.0"},
      "precision": "int8",                        fp32 | fp16 | int8 | mixed
      "layer_precision": {"conv1": "int8", ..., "fc8": "fp32"},
      "placement": "cpu",                         Q/DQ placement target (INT8 only), else null
      "source": {"model_sha256": ..., "calibration_sha256": ... or null,
                 "checkpoint_sha256": ...},       the checkpoint the ONNX model was exported from
      "artifacts": {"model.onnx": "<sha256>"},
      "input": {"name": "input", "shape": [3, 227, 227], "dtype": "float32",
                "layout": "NCHW",                 uint8 + NHWC: --input uint8-nhwc
                "min_batch": 1, "max_batch": null,    null: any batch size
                "opt_batch": null},                   TensorRT: the batch the profile is tuned for
      "output": {"name": "logits", "num_classes": 10},
      "preprocess": {...PreprocessSpec...},
      "classes": [...],
      "build": {"seconds": 1.9, "timestamp": "2026-...Z",
                "host": {"hostname": ..., "platform": ..., "cpu": ..., "gpu": ...},
                "timing_cache": null},               TensorRT: the timing cache file used
      "notes": [...],
      "tuning": {...}                             accuracy-budgeted INT8 builds only
    }

:func:`load_engine` checks, in order: the folder exists and holds a sidecar, the sidecar parses,
every artifact's sha256 matches it, the backend is installed, and the installed backend can run an
engine built by the recorded version (see each backend's ``check_compatible``). Each failure is one
:class:`~alexnet_deploy.errors.UserError` line. :func:`engine_dir_atomic` is how build writes a
whole folder at once: into a temporary folder beside the destination, renamed into place only
when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from alexnet_deploy import __version__
from alexnet_deploy.backends import get_backend
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import (
    check_writable_dir,
    make_parent,
    remove_stale_temporaries,
    sha256_file,
    temporary_prefix,
    umask,
    write_json_atomic,
)
from alexnet_deploy.preprocess import ImageLike, PreprocessSpec, open_image

FORMAT = "alexnet-deploy/engine/1"
SIDECAR_NAME = "engine.json"
#: what ``build --precision`` makes, and what one layer of an engine runs in
BUILD_PRECISIONS = LAYER_PRECISIONS = ("fp32", "fp16", "int8")
#: an engine's overall precision: ``mixed`` is INT8 with some layers kept in higher precision
PRECISIONS = (*BUILD_PRECISIONS, "mixed")
INPUT_FORMATS = ("float32-nchw", "uint8-nhwc")  # rewrite.INPUT_FORMATS; engine.py imports no onnx


@dataclass
class EngineSidecar:
    """What an engine is, how it was built, and what its artifacts must hash to.

    Args:
        backend: backend name (``onnxruntime``, ``openvino``, ``tensorrt``).
        backend_version: the backend's version at build time.
        precision: ``fp32``, ``fp16``, ``int8`` or ``mixed`` (INT8 with some layers kept FP32).
        layer_precision: ``conv1`` .. ``fc8`` -> ``fp32`` / ``fp16`` / ``int8``.
        artifacts: artifact file name -> sha256, for every file the backend loads.
        preprocess: the preprocessing spec the engine's inputs must follow.
        classes: class names in logit order.
        input_name: name of the input tensor. Defaults to ``"input"``.
        input_shape: ``(C, H, W)`` of one input.
        min_batch: smallest batch the engine takes. Defaults to 1.
        max_batch: largest batch it takes; None for any (the CPU backends). Defaults to None.
        opt_batch: the batch a TensorRT profile is tuned for; None for the CPU backends.
            Defaults to None.
        placement: the Q/DQ placement target of an INT8 graph (``cpu`` or ``tensorrt``); None
            for FP32/FP16. Defaults to None.
        model_sha256: sha256 of the ONNX model the engine was built from.
        calibration_sha256: sha256 of the calibration file (INT8), else None.
        checkpoint_sha256: sha256 of the checkpoint the ONNX model was exported from ("" if
            unknown).
        build_seconds: wall time of the build.
        built_at: UTC timestamp of the build (ISO 8601).
        host: where it was built: hostname, platform, cpu, and gpu where there is one.
        timing_cache: the TensorRT timing cache file the build read and updated; None when
            none was used. Defaults to None.
        output_name: name of the logits output. Defaults to ``"logits"``.
        notes: remarks a user should see with the engine (e.g. how a backend runs FP16).
        version: the alexnet-deploy version that built it.
        input_format: what :meth:`Engine.infer` feeds the artifact: ``float32-nchw`` (the
            preprocessed image; the default) or ``uint8-nhwc`` (the resized, cropped RGB pixels;
            the graph does the scaling, mean/std and layout). ``input_shape`` stays ``(C, H, W)``.
        tuning: how an accuracy-budgeted INT8 build chose its engine (method, per-layer
            precision, held-out figures, speed cost); None otherwise. Defaults to None.
    """

    backend: str
    backend_version: str
    precision: str
    layer_precision: dict[str, str]
    artifacts: dict[str, str]
    preprocess: PreprocessSpec
    classes: list[str]
    input_shape: tuple[int, int, int]
    input_name: str = "input"
    min_batch: int = 1
    max_batch: int | None = None
    opt_batch: int | None = None
    placement: str | None = None
    model_sha256: str = ""
    calibration_sha256: str | None = None
    checkpoint_sha256: str = ""
    build_seconds: float = 0.0
    built_at: str = ""
    host: dict[str, str] = field(default_factory=dict)
    output_name: str = "logits"
    notes: list[str] = field(default_factory=list)
    timing_cache: str | None = None
    version: str = __version__
    input_format: str = "float32-nchw"
    tuning: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"engine precision {self.precision!r} is not one of {PRECISIONS}")
        bad = {k: v for k, v in self.layer_precision.items() if v not in LAYER_PRECISIONS}
        if bad:
            raise UserError(f"engine layer precision {bad} is not one of {LAYER_PRECISIONS}")
        self.input_shape = tuple(int(v) for v in self.input_shape)  # type: ignore[assignment]
        if self.input_format not in INPUT_FORMATS:
            raise UserError(f"engine input format {self.input_format!r} is not one of "
                            f"{INPUT_FORMATS}: rebuild the engine")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_dtype(self) -> str:
        """numpy dtype name of what the engine takes: ``float32``, or ``uint8`` for a
        ``uint8-nhwc`` engine."""
        return self.input_format.split("-")[0]

    @property
    def input_dims(self) -> tuple[int, int, int]:
        """One image as the engine takes it: ``(C, H, W)`` float32, or ``(H, W, C)`` uint8
        pixels for a ``uint8-nhwc`` engine (``input_shape`` is ``(C, H, W)`` for both)."""
        c, h, w = self.input_shape
        return (h, w, c) if self.input_format == "uint8-nhwc" else (c, h, w)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "alexnet_deploy_version": self.version,
            "backend": {"name": self.backend, "version": self.backend_version},
            "precision": self.precision,
            "layer_precision": dict(self.layer_precision),
            "placement": self.placement,
            "source": {"model_sha256": self.model_sha256,
                       "calibration_sha256": self.calibration_sha256,
                       "checkpoint_sha256": self.checkpoint_sha256},
            "artifacts": dict(self.artifacts),
            "input": {"name": self.input_name, "shape": list(self.input_shape),
                      "dtype": self.input_dtype,
                      "layout": self.input_format.split("-")[1].upper(),
                      "min_batch": self.min_batch, "max_batch": self.max_batch,
                      "opt_batch": self.opt_batch},
            "output": {"name": self.output_name, "num_classes": self.num_classes},
            "preprocess": self.preprocess.to_dict(),
            "classes": list(self.classes),
            "build": {"seconds": round(self.build_seconds, 3), "timestamp": self.built_at,
                      "host": dict(self.host), "timing_cache": self.timing_cache},
            "notes": list(self.notes),
            **({"tuning": self.tuning} if self.tuning is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "the sidecar") -> EngineSidecar:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise UserError(f"{where} is not an alexnet-deploy engine sidecar (format {found!r}, "
                            f"expected {FORMAT!r}): rebuild the engine with 'alexnet-deploy build'")
        try:
            return cls(
                backend=str(d["backend"]["name"]),
                backend_version=str(d["backend"]["version"]),
                precision=str(d["precision"]),
                layer_precision={str(k): str(v) for k, v in d["layer_precision"].items()},
                artifacts={str(k): str(v) for k, v in d["artifacts"].items()},
                preprocess=PreprocessSpec.from_dict(d["preprocess"]),
                classes=[str(c) for c in d["classes"]],
                input_shape=tuple(d["input"]["shape"]),
                input_name=str(d["input"]["name"]),
                min_batch=int(d["input"].get("min_batch", 1)),
                max_batch=(None if d["input"].get("max_batch") is None
                           else int(d["input"]["max_batch"])),
                opt_batch=(None if d["input"].get("opt_batch") is None
                           else int(d["input"]["opt_batch"])),
                placement=d.get("placement"),
                model_sha256=str(d["source"]["model_sha256"]),
                calibration_sha256=d["source"].get("calibration_sha256"),
                checkpoint_sha256=str(d["source"].get("checkpoint_sha256", "")),
                build_seconds=float(d["build"]["seconds"]),
                built_at=str(d["build"]["timestamp"]),
                host={str(k): str(v) for k, v in d["build"].get("host", {}).items()},
                output_name=str(d.get("output", {}).get("name", "logits")),
                notes=[str(n) for n in d.get("notes", [])],
                timing_cache=d["build"].get("timing_cache"),
                version=str(d.get("alexnet_deploy_version", "")),
                input_format=(f"{d['input'].get('dtype', 'float32')}-"
                              f"{d['input'].get('layout', 'NCHW').lower()}"),
                tuning=d.get("tuning"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where} is missing or has a malformed field ({type(e).__name__}: "
                            f"{e}): rebuild the engine") from e


def sidecar_path(engine_dir: Path | str) -> Path:
    return Path(engine_dir) / SIDECAR_NAME


def write_sidecar(engine_dir: Path | str, sidecar: EngineSidecar) -> Path:
    """Write ``engine_dir/engine.json`` (atomically); return its path."""
    path = sidecar_path(engine_dir)
    write_json_atomic(path, sidecar.to_dict())
    return path


def engine_folder(path: Path | str) -> Path:
    """The engine folder ``path`` names (the folder, or its ``engine.json``); UserError if none."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"engine {path} does not exist: build one with 'alexnet-deploy build "
                        "--model MODEL.onnx --precision fp32 --out engines/NAME'")
    if path.is_file() and path.name == SIDECAR_NAME:
        path = path.parent
    if not path.is_dir() or not sidecar_path(path).is_file():
        raise UserError(f"{path} is not an engine folder (no {SIDECAR_NAME} in it): pass the "
                        "folder written by 'alexnet-deploy build --out engines/NAME'")
    return path


def read_sidecar(path: Path | str) -> EngineSidecar:
    """The parsed sidecar of the engine at ``path`` (its folder or its ``engine.json``)."""
    folder = engine_folder(path)
    where = str(sidecar_path(folder))
    try:
        data = json.loads(sidecar_path(folder).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where} is not valid JSON ({e}): rebuild the engine") from e
    return EngineSidecar.from_dict(data, where)


def check_artifacts(engine_dir: Path | str, sidecar: EngineSidecar) -> None:
    """UserError unless every artifact the sidecar lists is present with the recorded sha256."""
    engine_dir = Path(engine_dir)
    if not sidecar.artifacts:
        raise UserError(f"{sidecar_path(engine_dir)} lists no engine files: rebuild the engine")
    for name, digest in sidecar.artifacts.items():
        path = engine_dir / name
        if Path(name).name != name:
            raise UserError(f"{sidecar_path(engine_dir)} names an artifact outside its folder "
                            f"({name!r}): rebuild the engine")
        if not path.is_file():
            raise UserError(f"engine file {path} is missing: the folder is incomplete; rebuild it")
        if sha256_file(path) != digest:
            raise UserError(f"sidecar does not match the engine file {path} (sha256 differs): it "
                            "was changed after the build; rebuild the engine")


def host_info(**extra: str) -> dict[str, str]:
    """Hostname, OS, CPU model, plus ``extra`` (a backend's device: gpu name and so on)."""
    return {"hostname": socket.gethostname(), "platform": platform.platform(),
            "cpu": cpu_model(), **extra}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def engine_dir_atomic(dest: Path | str) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``dest``; move it onto ``dest`` on success.

    ``dest`` may be absent, an empty folder, or an earlier engine (replaced). Anything else is
    refused before work starts, so a build never overwrites a folder it did not write. On an
    exception or interrupt the temporary folder is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    check_writable_dir(dest)
    remove_stale_temporaries(dest)  # first: it may put back an engine a killed build moved aside
    if dest.exists() and not (dest.is_dir() and (not any(dest.iterdir())
                                                 or sidecar_path(dest).is_file())):
        raise UserError(f"{dest} exists and is not an engine folder: choose another --out or "
                        "remove it")
    make_parent(dest)
    tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(dest), suffix=".tmp", dir=dest.parent))
    old: Path | None = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700
        if dest.exists():
            # rename(2) cannot replace a non-empty folder: move the old engine aside first
            old = Path(tempfile.mkdtemp(prefix=temporary_prefix(dest), suffix=".old",
                                        dir=dest.parent))
            os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
    except BaseException:
        if old is not None and not dest.exists():
            os.replace(old / dest.name, dest)  # put the previous engine back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, best first.

    Args:
        source: the image's file path, or ``<array 3>``-style label for in-memory images.
        indices: class indices (logit positions).
        labels: class names, as recorded in the engine's sidecar.
        probabilities: softmax probabilities (computed in float64 over all the logits).
    """

    source: str
    indices: list[int]
    labels: list[str]
    probabilities: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.source,
                "top_k": [{"index": i, "label": label, "probability": p}
                          for i, label, p in zip(self.indices, self.labels, self.probabilities)]}


def top_k_predictions(logits: np.ndarray, classes: Sequence[str], k: int,
                      sources: Sequence[str]) -> list[Prediction]:
    """One :class:`Prediction` per row of ``logits`` ``[N, num_classes]``: the ``k`` most
    probable classes (ties keep the lower index first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    probs = z / z.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [Prediction(source=src, indices=[int(i) for i in row],
                       labels=[classes[int(i)] for i in row],
                       probabilities=[float(p[int(i)]) for i in row])
            for src, row, p in zip(sources, order, probs)]


def _source_label(image: Any, position: int) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    filename = getattr(image, "filename", "")  # PIL images opened from a file keep its name
    return filename or f"<{type(image).__name__} {position}>"


@dataclass
class Engine:
    """A loaded engine: its sidecar and a runner.

    :meth:`infer`, :meth:`preprocess` and :meth:`classify` are safe to call from several threads
    at once (each backend's runner is; see :class:`alexnet_deploy.backends.Runner`).
    """

    path: Path
    sidecar: EngineSidecar
    runner: Any  # backends.Runner

    @property
    def takes_uint8(self) -> bool:
        """True for an engine built with ``--input uint8-nhwc``."""
        return self.sidecar.input_dtype == "uint8"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Float32 logits ``[N, num_classes]`` for a preprocessed float32 ``[N, C, H, W]`` batch
        or, for a ``uint8-nhwc`` engine, also for its uint8 ``[N, H, W, C]`` pixels (what
        :meth:`preprocess` returns for it). A float batch given to a uint8 engine is converted
        (:meth:`PreprocessSpec.denormalize`, exact for preprocessed images)."""
        c, h, w = self.sidecar.input_shape
        if self.takes_uint8 and isinstance(batch, np.ndarray) and batch.dtype == np.uint8:
            shape, want = self.sidecar.input_dims, "uint8 (N, H, W, C)"
        else:
            batch, shape, want = np.asarray(batch, dtype=np.float32), (c, h, w), "(N, C, H, W)"
        if batch.ndim != 4 or tuple(batch.shape[1:]) != shape:
            raise UserError(f"input batch of shape {tuple(batch.shape)} does not match engine "
                            f"{self.path} {want} = (N, {', '.join(map(str, shape))})")
        if self.takes_uint8 and batch.dtype != np.uint8:
            batch = self.sidecar.preprocess.denormalize(batch)
        self.runner.input_metadata().check_batch(batch.shape[0])
        return self.runner.infer(np.ascontiguousarray(batch))

    def preprocess(self, images: Sequence[ImageLike]) -> np.ndarray:
        """The engine's inputs for ``images`` (paths, encoded bytes, PIL images or uint8 HWC RGB
        arrays), through its stored preprocessing spec: float32 ``[N, C, H, W]``, or for a
        ``uint8-nhwc`` engine (``sidecar.input_format``) the resized, cropped uint8
        ``[N, H, W, C]`` pixels, a quarter of the bytes.

        Raises:
            UserError: naming the first image that cannot be read.
        """
        return np.stack([self._load(image, i) for i, image in enumerate(images)])

    def _load(self, image: ImageLike, position: int) -> np.ndarray:
        """One image as this engine takes it: CHW float32, or HWC uint8 pixels."""
        spec = self.sidecar.preprocess
        opened = open_image(image, _source_label(image, position))
        return spec.crop_uint8(opened) if self.takes_uint8 else spec.load(opened)

    def classify(self, images: ImageLike | Sequence[ImageLike], top_k: int = 5,
                 batch_size: int | None = None) -> list[Prediction]:
        """The ``top_k`` classes of each image, in input order.

        Args:
            images: one image or a sequence of them: file paths, encoded bytes, PIL images or
                uint8 ``HxWx3`` RGB arrays.
            top_k: classes per image, 1 to the number of classes. Defaults to 5.
            batch_size: images per engine call, within the engine's batch range. Defaults to
                32 (clamped to the range).

        Raises:
            UserError: an image cannot be read (named), or ``top_k``/``batch_size`` is out of
                range.
        """
        return list(self.iter_classify(images, top_k, batch_size))

    def iter_classify(self, images: ImageLike | Sequence[ImageLike], top_k: int = 5,
                      batch_size: int | None = None, *,
                      on_unreadable: Callable[[str, str], None] | None = None
                      ) -> Iterator[Prediction]:
        """:meth:`classify`, yielding predictions as batches finish. The next batch is decoded
        in a background thread while the current one runs on the engine.

        Args:
            on_unreadable: called with ``(source, message)`` for an image that cannot be read,
                which is then skipped. Defaults to None: raise UserError instead.
        """
        if isinstance(images, (str, Path, bytes, bytearray, memoryview, Image.Image)) or (
                isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        images = list(images)
        if not 1 <= top_k <= self.sidecar.num_classes:
            raise UserError(f"top_k {top_k} is out of range: choose 1 to "
                            f"{self.sidecar.num_classes} (the engine's classes)")
        size = self.resolve_batch_size(batch_size)
        chunks = [range(start, min(start + size, len(images)))
                  for start in range(0, len(images), size)]

        def decode(chunk: range) -> tuple[np.ndarray | None, list[str]]:
            arrays, sources = [], []
            for i in chunk:
                source = _source_label(images[i], i)
                try:
                    arrays.append(self._load(images[i], i))
                except UserError as e:
                    if on_unreadable is None:
                        raise
                    on_unreadable(source, str(e))
                    continue
                sources.append(source)
            return (np.stack(arrays) if arrays else None), sources

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="classify-decode") as pool:
            pending = pool.submit(decode, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                batch, sources = pending.result()
                if k + 1 < len(chunks):
                    pending = pool.submit(decode, chunks[k + 1])
                if batch is None:
                    continue
                yield from top_k_predictions(self.infer_padded(batch), self.sidecar.classes,
                                             top_k, sources)

    def resolve_batch_size(self, requested: int | None) -> int:
        """``requested`` checked against the engine's batch range, or None -> 32 clamped to
        it."""
        lo, hi = self.sidecar.min_batch, self.sidecar.max_batch
        if requested is None:
            return max(lo, min(32, hi or 32))
        if requested < 1 or requested < lo or (hi is not None and requested > hi):
            raise UserError(f"batch size {requested} is outside this engine's range ({lo}.."
                            f"{hi or 'any'})")
        return requested

    def infer_padded(self, batch: np.ndarray) -> np.ndarray:
        """:meth:`infer` for any batch up to the largest: one smaller than the engine's smallest
        batch (a TensorRT profile may start above 1) is padded with copies of its last image,
        and only its own logits are returned."""
        n = len(batch)
        if n < self.sidecar.min_batch:
            pad = np.repeat(batch[-1:], self.sidecar.min_batch - n, axis=0)
            return self.infer(np.concatenate([batch, pad]))[:n]
        return self.infer(batch)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> Engine:  # noqa: PYI034 - same shape as Runner
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_engine(path: Path | str, threads: int | None = None) -> Engine:
    """Load and check the engine at ``path`` (its folder or its ``engine.json``).

    Args:
        path: the engine folder written by ``alexnet-deploy build``.
        threads: CPU threads for CPU backends; None lets the backend choose. Defaults to None.

    Raises:
        UserError: the folder is missing or not an engine, the sidecar is malformed or does not
            match the engine file, the backend is not installed, or the installed backend cannot
            run an engine built by the recorded version.
    """

    folder = engine_folder(path)
    sidecar = read_sidecar(folder)
    check_artifacts(folder, sidecar)
    backend = get_backend(sidecar.backend)
    backend.check_compatible(sidecar)
    runner = backend.load(folder, sidecar, threads=threads)
    return Engine(path=folder, sidecar=sidecar, runner=runner)
