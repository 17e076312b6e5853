"""Inference backends behind one small interface.

A backend module (``onnxruntime``, ``openvino``, ``tensorrt``) defines one :class:`Backend`
subclass and registers it in :data:`BACKENDS`. Adding a backend adds one module; no caller changes.

    backend = get_backend("onnxruntime")          # UserError if unknown / not installed
    files = backend.build(graph, engine_dir, ...)  # write the engine artifact(s)
    runner = backend.load(engine_dir, sidecar)     # a Runner
    logits = runner.infer(batch)                   # float32 NCHW in, float32 logits out

GPU-only packages (tensorrt, pycuda) are imported inside the methods that need them, never at
module load, so this package imports on any machine.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alexnet_deploy import quantize
from alexnet_deploy.errors import UserError, first_line  # noqa: F401 - backends use it

if TYPE_CHECKING:
    import onnx

# name -> module path; each module defines BACKEND (an instance of a Backend subclass)
BACKENDS = {
    "onnxruntime": "alexnet_deploy.backends.onnxruntime",
    "openvino": "alexnet_deploy.backends.openvino",
    "tensorrt": "alexnet_deploy.backends.tensorrt",
}
# `--backend auto` tries these in order and takes the first available
AUTO_ORDER = ("tensorrt", "openvino", "onnxruntime")


@dataclass(frozen=True)
class InputMetadata:
    """What a runner accepts: ``name``, ``(C, H, W)``, dtype, and the batch sizes it takes."""

    name: str
    chw: tuple[int, int, int]
    dtype: str = "float32"
    min_batch: int = 1
    max_batch: int | None = None  # None: unbounded

    def check_batch(self, batch_size: int) -> None:
        hi = "any" if self.max_batch is None else str(self.max_batch)
        if batch_size < self.min_batch or (self.max_batch is not None
                                           and batch_size > self.max_batch):
            raise UserError(f"batch size {batch_size} is outside this engine's profile "
                            f"({self.min_batch}..{hi}); rebuild it with a wider profile")


class Runner(ABC):
    """A loaded engine. ``infer`` takes a float32 NCHW batch and returns float32 logits.

    Every runner's ``infer`` is safe to call from several threads at once (web servers, Triton's
    Python backend and C++ apps do): each backend's runner docstring says how it achieves that.
    ``close`` must not race with ``infer``.
    """

    #: what ``bench`` may ask of this runner beyond ``infer`` (GPU runners; CPU runners have
    #: none): ``"no_transfers"`` (:meth:`set_transfers`) and ``"stage_timings"``
    #: (:meth:`timings`).
    capabilities: frozenset[str] = frozenset()

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def set_transfers(self, transfers: bool) -> None:
        """With ``"no_transfers"`` in :attr:`capabilities`: ``False`` keeps each distinct
        input batch resident on the device after its first upload and skips copying the logits
        back (``infer`` then returns no logits: for timing only). Others raise."""
        raise NotImplementedError(f"{type(self).__name__} has no host-device transfers to skip")

    def timings(self) -> dict[str, float] | None:
        """With ``"stage_timings"`` in :attr:`capabilities`: the calling thread's last
        ``infer`` call's ``h2d``, ``compute`` and ``d2h`` times in ms from CUDA events (a key is
        absent when the stage was skipped), and ``enqueue``, the host time of the launch call.
        Defaults to None."""
        return None

    @abstractmethod
    def input_metadata(self) -> InputMetadata: ...

    def close(self) -> None:
        """Release device memory / sessions. Defaults to doing nothing."""

    def __enter__(self) -> Runner:  # noqa: PYI034 - typing.Self needs Python 3.11; we support 3.10
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(ABC):
    """One inference framework: builds engines from ONNX graphs and loads them."""

    name: str = ""
    install_hint: str = ""  # shown when the backend is not installed
    device: str = "cpu"

    @abstractmethod
    def available(self) -> bool:
        """True when the framework imports and can run here."""

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def build(self, graph: onnx.ModelProto, engine_dir: Path, *, max_batch: int = 64,
              threads: int | None = None) -> list[str]:
        """Write the engine artifact(s) into ``engine_dir``; return their file names."""

    @abstractmethod
    def load(self, engine_dir: Path, sidecar: Any, *, threads: int | None = None) -> Runner: ...

    # ---- optional hooks with defaults (a backend overrides what differs) ----

    #: where INT8 Q/DQ pairs go for this backend (see :func:`alexnet_deploy.quantize.to_int8`)
    qdq_target: str = "cpu"
    #: True when ``build``'s ``max_batch`` bounds the engine (an optimization profile); CPU
    #: backends run the dynamic-batch graph at any batch size
    fixed_batch_range: bool = False

    #: what an INT8 graph leaves unquantized runs in: ``fp32`` or ``fp16``
    #: (:func:`~alexnet_deploy.quantize.to_int8_fp16`); ``build --int8-fallback`` overrides it
    default_int8_fallback: str = "fp32"

    def precision_graph(self, graph: onnx.ModelProto, precision: str, calibration: Any = None,
                        keep_fp32: tuple[str, ...] = (), int8_fallback: str | None = None,
                        ) -> onnx.ModelProto:
        """The canonical export ``graph`` in ``precision``: ``fp32`` unchanged, ``fp16``
        :func:`~alexnet_deploy.quantize.to_fp16`, ``int8`` :func:`~alexnet_deploy.quantize.to_int8`
        with this backend's :attr:`qdq_target` and the ``keep_fp32`` layers left unquantized;
        with ``int8_fallback`` ``"fp16"`` (default :attr:`default_int8_fallback`) what is not
        quantized runs in FP16 (:func:`~alexnet_deploy.quantize.to_int8_fp16`)."""

        if precision == "fp16":
            return quantize.to_fp16(graph)
        if precision == "int8":
            fallback = int8_fallback or self.default_int8_fallback
            make = quantize.to_int8_fp16 if fallback == "fp16" else quantize.to_int8
            return make(graph, calibration, target=self.qdq_target, keep_fp32=tuple(keep_fp32))
        return graph

    def rewrite_graph(self, graph: onnx.ModelProto) -> onnx.ModelProto:
        """An exact, backend-specific rewrite applied last, to :meth:`precision_graph`'s result
        (e.g. a faster LRN form). Defaults to ``graph`` unchanged."""
        return graph

    def check_compatible(self, sidecar: Any) -> None:
        """Raise UserError when an engine built with ``sidecar.backend_version`` (and on
        ``sidecar.host``) cannot run on this installation. Defaults to accepting it."""

    def notes(self, precision: str) -> list[str]:
        """Remarks for the sidecar about how this backend runs ``precision``. Defaults to none."""
        return []

    def device_info(self) -> dict[str, str]:
        """What the build host's accelerator is, for the sidecar (e.g. ``{"gpu": ...}``).
        Defaults to nothing (CPU backends: the CPU is recorded for every engine)."""
        return {}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (or the best available for ``"auto"``); UserError otherwise."""
    if name == "auto":
        for candidate in AUTO_ORDER:
            backend = _module_backend(candidate)
            if backend.available():
                return backend
        raise UserError("no inference backend is available: pip install onnxruntime")
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}: choose one of auto, {', '.join(BACKENDS)}")
    backend = _module_backend(name)
    if not backend.available():
        raise UserError(f"backend {name} is not installed or cannot run here: "
                        f"{backend.install_hint}")
    return backend


def _module_backend(name: str) -> Backend:
    return importlib.import_module(BACKENDS[name]).BACKEND
