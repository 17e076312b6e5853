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

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alexnet_deploy.backends import Backend, InputMetadata, Runner, first_line
from alexnet_deploy.errors import UserError

if TYPE_CHECKING:
    import onnx

ARTIFACT = "model.onnx"
FP16_NOTE = ("ONNX Runtime's CPU provider runs FP16 graphs by inserting casts to FP32 around ops "
             "without FP16 kernels: this engine checks FP16 accuracy, it is not faster than FP32")


def session_options(threads: int | None = None):
    """CPU ``SessionOptions``: ``threads`` intra-op threads (None: ONNX Runtime's default, one per
    physical core), one inter-op thread, every graph optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or 0)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no warnings on stderr for every session
    # Idle worker threads sleep instead of spinning: on a 2-core machine shared with the caller's
    # own threads, spinning cost the INT8 engine 30-40% (docs/results-quantize.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def cpu_session(model: str | Path | bytes, threads: int | None = None):
    """An ``InferenceSession`` on the CPU provider; UserError (one line) if ONNX Runtime refuses."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                    sess_options=session_options(threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        raise UserError(f"ONNX Runtime {ort.__version__} cannot load the model "
                        f"({first_line(e)})") from e


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime session; :meth:`infer` is safe to call from several threads at once.

    ``InferenceSession.run`` is documented thread-safe: concurrent calls share the session's
    weights and its intra-op thread pool, each with its own inputs and outputs, so the runner
    needs no lock and no per-thread state.
    """

    def __init__(self, session: Any, meta: InputMetadata) -> None:
        self.session = session
        self.meta = meta
        self.output_name = session.get_outputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
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
        # 1.2x FP32 with the NCHW form, 2.0x channels-last; docs/results-quantize.md).
        if any(n.op_type == "QuantizeLinear" for n in graph.graph.node):
            from alexnet_deploy.quantize import lrn_channels_last
            from alexnet_deploy.rewrite import record_rewrite

            rewritten = lrn_channels_last(graph)
            record_rewrite(rewritten, "lrn_channels_last")
            return rewritten
        from alexnet_deploy.rewrite import lrn_for_onnxruntime

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
