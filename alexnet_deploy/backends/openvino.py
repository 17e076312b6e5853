"""OpenVINO on CPU: the optional fast CPU backend (``pip install openvino``, no GPU needed).

``--backend auto`` prefers it over ONNX Runtime when it is installed. OpenVINO reads ONNX itself
(``openvino.convert_model``); the artifact is the converted model saved as IR (``model.xml`` +
``model.bin``, ``openvino.save_model`` with ``compress_to_fp16=False`` so FP32 weights stay FP32):

* FP32: the canonical graph (OpenVINO's native LRN is fast; no rewrite needed).
* FP16: :func:`alexnet_deploy.quantize.to_fp16` of the canonical graph.
* INT8: :func:`alexnet_deploy.quantize.to_int8` with the placement in :data:`QDQ_TARGET`,
  ``"cpu"``: measured faster in OpenVINO than the TensorRT placement (Q/DQ on Conv/Gemm inputs
  only). Full-size AlexNet, batch 16, 2 threads, OpenVINO 2026.4 on a 2-core Xeon with AMX,
  interleaved runs on a loaded machine: 2.97 vs 3.80 CPU-ms per image (203 vs 152 img/s median);
  the "cpu" placement also quantizes conv1/conv2's outputs before LRN, so more of the graph runs
  on 8-bit data.

Precision means what it says: on CPUs with bf16 (AMX, AVX512_BF16) OpenVINO's default
``INFERENCE_PRECISION_HINT`` is bf16, which would silently run an "FP32" engine in bf16. The
runner sets the hint from the engine's precision: ``f32`` for FP32 and INT8/mixed engines (the
non-quantized layers run FP32), ``f16`` for FP16 engines where the CPU reports FP16 support
(else ``f32``, noted in the sidecar). ``INFERENCE_NUM_THREADS`` is ``threads``; one stream.
Measured on the full-size model (random weights, batch 16) on the AMX machine above: under the
bf16 default the FP32 model's logits differ from ONNX Runtime FP32 by up to 0.067, with ``f32`` by
1.8e-5. The price is speed (bf16 ran about 3x faster); and ``f16`` there ran FP16 engines slower
than FP32 (15.5 vs 13.3 CPU-ms per image: the CPU has AVX512-FP16 but no AMX-FP16).

IR written by a newer OpenVINO major version than the installed one is refused at load.
"""

from __future__ import annotations

import importlib.util
import queue
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alexnet_deploy.backends import Backend, InputMetadata, Runner, first_line
from alexnet_deploy.errors import UserError

if TYPE_CHECKING:
    import onnx

XML, BIN = "model.xml", "model.bin"
# The INT8 Q/DQ placement OpenVINO runs fastest (measured; see the module docstring)
QDQ_TARGET = "cpu"


def _major(version: str) -> int:
    """``"2026.4.1-22982-..."`` -> 2026 (0 when unparseable)."""
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def inference_precision(precision: str) -> str:
    """The ``INFERENCE_PRECISION_HINT`` for an engine of ``precision`` on this CPU."""
    if precision == "fp16" and cpu_supports_fp16():
        return "f16"
    return "f32"


def cpu_supports_fp16() -> bool:
    import openvino as ov

    return "FP16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(precision: str, threads: int | None) -> dict[str, Any]:
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": inference_precision(precision),
                              "NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class OpenVinoRunner(Runner):
    """A compiled OpenVINO model; :meth:`infer` is safe to call from several threads at once.

    An ``InferRequest`` holds its input and output tensors, so two threads sharing one would
    overwrite each other's data (silently wrong logits) or fail with "Infer Request is busy".
    Each call therefore takes an idle request from a pool and puts it back when done; a new
    request is created only when every pooled one is busy, so the pool grows to the largest
    number of concurrent callers and no further. Requests share the compiled model's weights
    and CPU streams: concurrent calls queue inside OpenVINO rather than oversubscribing cores.
    """

    def __init__(self, compiled: Any, meta: InputMetadata) -> None:
        self.compiled = compiled
        self.output = compiled.output(0)
        self.meta = meta
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._idle.put(compiled.create_infer_request())

    def _request(self) -> Any:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self.compiled.create_infer_request()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        request = self._request()
        try:
            result = request.infer({self.meta.name: batch}, share_inputs=True)
            # copy out of the request's output tensor before another caller reuses the request
            return np.array(result[self.output], dtype=np.float32)
        finally:
            self._idle.put(request)

    def input_metadata(self) -> InputMetadata:
        return self.meta

    def close(self) -> None:
        self._idle = queue.SimpleQueue()
        self.compiled = None


class OpenVinoBackend(Backend):
    name = "openvino"
    install_hint = "pip install openvino (or: pip install 'alexnet-deploy[openvino]')"
    device = "cpu"
    qdq_target = QDQ_TARGET

    def available(self) -> bool:
        return importlib.util.find_spec("openvino") is not None

    def version(self) -> str:
        import openvino as ov

        return ov.__version__

    # No rewrite: rewrite.lrn_fold_towers (one LRN over [2N, C/2, H, W] instead of Split / two
    # LRNs / Concat) measured no faster here, full-size INT8 at batch 16: OpenVINO already runs
    # the Split / Concat in place, and one LRN costs what two did (docs/results.md, "INT8 accuracy budget").

    def notes(self, precision: str) -> list[str]:
        if precision == "fp16" and not cpu_supports_fp16():
            return [("this CPU has no FP16 arithmetic: OpenVINO runs the FP16 engine's layers in "
                     "FP32 (FP16 weights, FP32 compute)")]
        return []

    def build(self, graph: onnx.ModelProto, engine_dir: Path, *, max_batch: int = 64,
              threads: int | None = None) -> list[str]:
        import openvino as ov

        engine_dir = Path(engine_dir)
        onnx_path = engine_dir / ".source.onnx"  # convert_model reads ONNX from a file
        onnx_path.write_bytes(graph.SerializeToString())
        try:
            model = ov.convert_model(str(onnx_path))
        except Exception as e:
            raise UserError(f"OpenVINO {ov.__version__} cannot convert the model "
                            f"({first_line(e)})") from e
        finally:
            onnx_path.unlink(missing_ok=True)
        ov.save_model(model, str(engine_dir / XML), compress_to_fp16=False)
        return [XML, BIN]

    def check_compatible(self, sidecar: Any) -> None:
        built, here = sidecar.backend_version, self.version()
        if _major(built) > _major(here):
            raise UserError(f"engine was built with OpenVINO {built}, newer than the installed "
                            f"{here}: upgrade openvino or rebuild the engine here")

    def load(self, engine_dir: Path, sidecar: Any, *, threads: int | None = None) -> Runner:
        import openvino as ov

        core = ov.Core()
        try:
            model = core.read_model(str(Path(engine_dir) / XML))
            compiled = core.compile_model(model, "CPU",
                                          compile_config(sidecar.precision, threads))
        except Exception as e:
            raise UserError(f"OpenVINO {ov.__version__} cannot load engine {engine_dir} "
                            f"({first_line(e)}): rebuild it") from e
        meta = InputMetadata(name=sidecar.input_name, chw=tuple(sidecar.input_shape),
                             min_batch=sidecar.min_batch, max_batch=sidecar.max_batch)
        return OpenVinoRunner(compiled, meta)


BACKEND = OpenVinoBackend()
