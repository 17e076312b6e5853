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

from alexnet_deploy.errors import UserError

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
    """A loaded engine. ``infer`` takes a float32 NCHW batch and returns float32 logits."""

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def input_metadata(self) -> InputMetadata: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory / sessions. Defaults to doing nothing."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
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
    def build(self, graph: "onnx.ModelProto", engine_dir: Path, *, max_batch: int = 64,
              threads: int | None = None) -> list[str]:
        """Write the engine artifact(s) into ``engine_dir``; return their file names."""

    @abstractmethod
    def load(self, engine_dir: Path, sidecar: Any, *, threads: int | None = None) -> Runner: ...


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
