"""ONNX Runtime on CPU: the embedded default backend, always installed.

The artifact is ``model.onnx``, the graph ONNX Runtime runs for the engine's precision, made from the
canonical export and then rewritten by :func:`alexnet_deploy.rewrite.lrn_for_onnxruntime` (ONNX
Runtime's own ``LRN`` kernel is slow on CPU; the rewrite computes the same function faster, and
applied last it leaves Q/DQ placement and calibration keys alone):

* FP32: the canonical graph.
* INT8: :func:`alexnet_deploy.quantize.to_int8` with ``target="cpu"`` (Q/DQ placed where ONNX
  Runtime fuses them into integer kernels), its LRN blocks then laid out channels-last by
  :func:`alexnet_deploy.quantize.lrn_channels_last` instead of the NCHW rewrite.
* FP16: :func:`alexnet_deploy.quantize.to_fp16`. ONNX Runtime's CPU provider has few FP16
  kernels: it runs an FP16 graph by inserting ``Cast`` nodes to FP32 around the ops it lacks, so
  an FP16 engine here checks FP16 accuracy; it is not faster than FP32.

Loading creates an ``InferenceSession`` on the CPU execution provider with
``intra_op_num_threads=threads`` and graph optimization level ``ORT_ENABLE_ALL``. ONNX models are
portable, so an engine built with another ONNX Runtime version loads as long as this one
supports its opset (if not, the session error is reported as one line).
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alexnet_deploy.backends import Backend, InputMetadata, Runner
from alexnet_deploy.onnxrt import cpu_session, session_options  # noqa: F401 - part of this backend's API
from alexnet_deploy.quantize import lrn_channels_last
from alexnet_deploy.rewrite import lrn_for_onnxruntime, record_rewrite

if TYPE_CHECKING:
    import onnx

ARTIFACT = "model.onnx"
FP16_NOTE = ("ONNX Runtime's CPU provider runs FP16 graphs by inserting casts to FP32 around ops "
             "without FP16 kernels: this engine checks FP16 accuracy, it is not faster than FP32")


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session; :meth:`infer` is safe to call from several threads at once.

    ``InferenceSession.run`` is thread-safe: concurrent calls share the session's weights and
    its intra-op thread pool, each with its own inputs and outputs, so by default every call
    runs at once. Queueing them (one at a time, since one call already keeps the cores busy)
    measured slower, not faster: 4 callers on 2 cores got 0.89-1.02x one caller's img/s queued
    and 1.16-1.25x unqueued (docs/results.md, "Several threads per engine").

    Args:
        session: the ``InferenceSession``.
        meta: what the engine accepts.
        max_concurrent: run at most this many calls at once and queue the rest. Defaults to
            None (no limit).
    """

    def __init__(self, session: Any, meta: InputMetadata,
                 max_concurrent: int | None = None) -> None:
        self.session = session
        self.meta = meta
        self.output_name = session.get_outputs()[0].name
        self.max_concurrent = max_concurrent
        self._slots = (threading.BoundedSemaphore(max_concurrent) if max_concurrent
                       else contextlib.nullcontext())

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._slots:
            (logits,) = self.session.run([self.output_name], {self.meta.name: batch})
        return np.asarray(logits, dtype=np.float32)

    def input_metadata(self) -> InputMetadata:
        return self.meta

    def close(self) -> None:
        self.session = None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    install_hint = "pip install onnxruntime"
    device = "cpu"
    qdq_target = "cpu"

    def available(self) -> bool:
        return importlib.util.find_spec("onnxruntime") is not None

    def version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def rewrite_graph(self, graph: onnx.ModelProto) -> onnx.ModelProto:
        # A quantized graph gets the channels-last LRN form: written NCHW, the float LRN between
        # the integer convs and pools costs layout transposes and float pools (measured: INT8 at
        # 1.2x FP32 with the NCHW form, 2.0x channels-last; docs/notes.md).
        if any(n.op_type == "QuantizeLinear" for n in graph.graph.node):

            rewritten = lrn_channels_last(graph)
            record_rewrite(rewritten, "lrn_channels_last")
            return rewritten

        return lrn_for_onnxruntime(graph)

    def notes(self, precision: str) -> list[str]:
        return [FP16_NOTE] if precision == "fp16" else []

    def build(self, graph: onnx.ModelProto, engine_dir: Path, *, max_batch: int = 64,
              threads: int | None = None) -> list[str]:
        data = graph.SerializeToString()
        cpu_session(data, threads)  # refuse at build time what would fail at load time
        (Path(engine_dir) / ARTIFACT).write_bytes(data)
        return [ARTIFACT]

    def load(self, engine_dir: Path, sidecar: Any, *, threads: int | None = None) -> Runner:
        session = cpu_session(Path(engine_dir) / ARTIFACT, threads)
        meta = InputMetadata(name=sidecar.input_name, chw=tuple(sidecar.input_shape),
                             min_batch=sidecar.min_batch, max_batch=sidecar.max_batch)
        return OnnxRuntimeRunner(session, meta)


BACKEND = OnnxRuntimeBackend()
