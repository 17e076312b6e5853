"""TensorRT on an NVIDIA GPU (TensorRT 10 and 11, Python API), buffers and streams from pycuda.

Untested on real hardware: this project's development machines have no GPU, and TensorRT's native
libraries cannot be installed there, so nothing in this module has been run against a real
TensorRT. What is checked there: the module imports without ``tensorrt`` or ``pycuda``;
:meth:`TensorRtBackend.available` is False with an install hint; and, with fake ``tensorrt`` and
``pycuda`` modules, the exact sequence of API calls the builder and the runner make. Every API
name used below was checked to exist, with this signature, in the real TensorRT 10.16 and 11.4
Python bindings (``tensorrt_cu12_bindings``).

Install on a GPU machine: ``pip install tensorrt pycuda`` (NVIDIA's wheels on PyPI, or
``--extra-index-url https://pypi.nvidia.com``), or run inside the NGC TensorRT container
(``nvcr.io/nvidia/tensorrt``) and ``pip install pycuda`` there.

Precision comes from the ONNX graph, never from builder flags. TensorRT 11 networks are always
strongly typed: ``BuilderFlag.FP16``/``INT8`` and the INT8 calibrators are gone. TensorRT 10 gets
the same behaviour from ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (:func:`network_flags`;
TensorRT 11 deprecates that flag and ignores it, so it is not passed there). So FP16 is an FP16
ONNX graph (:func:`alexnet_deploy.quantize.to_fp16`) and INT8 is a Q/DQ graph with the TensorRT
placement (:func:`alexnet_deploy.quantize.to_int8` with ``target="tensorrt"``).
``BuilderFlag.TF32`` is cleared, so FP32 tensors compute in FP32 (TensorRT enables TF32 by
default).

Build::

    logger  = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))     # strongly typed
    parser  = trt.OnnxParser(network, logger); parser.parse(onnx_bytes)   # errors surfaced
    config  = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    profile = builder.create_optimization_profile()
    profile.set_shape(input, (1, C, H, W), (max, C, H, W), (max, C, H, W))
    config.add_optimization_profile(profile)
    plan    = builder.build_serialized_network(network, config)            -> model.engine

Run: ``trt.Runtime(logger).deserialize_cuda_engine(plan)``, ``engine.create_execution_context()``;
per batch ``context.set_input_shape``, ``set_tensor_address`` for input and output, and
``execute_async_v3(stream.handle)`` between pinned-memory host<->device copies on one CUDA stream.

A plan is tied to the exact TensorRT version and to the GPU's compute capability: an engine built
with another TensorRT version, or on a GPU of another compute capability, is refused at load with
a message saying to rebuild it.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alexnet_deploy.backends import Backend, InputMetadata, Runner, first_line
from alexnet_deploy.errors import UserError

if TYPE_CHECKING:
    import onnx

ARTIFACT = "model.engine"
INSTALL_HINT = "pip install tensorrt pycuda on a GPU machine, or use the NGC TensorRT container"
WORKSPACE_BYTES = 1 << 30  # builder scratch memory; AlexNet's largest tactic needs far less


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def _cuda_driver():
    """``pycuda.driver``, initialized. Raises when there is no CUDA driver or no GPU."""
    import pycuda.driver as cuda

    cuda.init()
    if cuda.Device.count() < 1:
        raise RuntimeError("no CUDA device")
    return cuda


def network_flags(trt: Any) -> int:
    """``create_network`` flags for a strongly typed network: the ``STRONGLY_TYPED`` bit on
    TensorRT 10; 0 on TensorRT 11 and later, where every network is strongly typed and the flag
    is deprecated (accepted and ignored)."""
    if int(trt.__version__.split(".", 1)[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_plan(onnx_bytes: bytes, *, max_batch: int, workspace: int = WORKSPACE_BYTES) -> bytes:
    """Parse an ONNX model into a strongly typed network and build a serialized plan with one
    optimization profile: batch 1 to ``max_batch``, tuned for ``max_batch``."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        detail = "; ".join(f"node {e.node_name() or e.node()} ({e.node_operator()}): {e.desc()}"
                           for e in errors[:3]) or "no detail"
        raise UserError(f"TensorRT {trt.__version__} cannot parse the model: {detail}")
    if network.num_inputs != 1:
        raise UserError(f"the model has {network.num_inputs} inputs; an AlexNet engine takes one")
    tensor = network.get_input(0)
    chw = tuple(int(d) for d in tuple(tensor.shape)[1:])
    if any(d < 1 for d in chw):
        raise UserError(f"model input {tensor.name} has dynamic C/H/W {chw}: re-export the model")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, (1, *chw), (max_batch, *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT {trt.__version__} failed to build the engine (its log above "
                        "says why); try a smaller --max-batch")
    return bytes(plan)


class TensorRtRunner(Runner):
    """Runs a deserialized plan on device 0 with pinned host buffers sized for the largest batch."""

    def __init__(self, plan: bytes, meta: InputMetadata) -> None:
        cuda = _cuda_driver()
        self.cuda = cuda
        self.cuda_context = cuda.Device(0).retain_primary_context()
        try:
            self.cuda_context.push()
            try:
                self._setup(plan)
            finally:
                cuda.Context.pop()
        except BaseException:
            self.cuda_context.detach()
            self.cuda_context = None
            raise
        self.meta = InputMetadata(name=self.input_name, chw=self.host_in.shape[1:],
                                  min_batch=meta.min_batch, max_batch=self.host_in.shape[0])

    def _setup(self, plan: bytes) -> None:
        """Deserialize, create the execution context, allocate buffers for the profile's
        largest batch and bind them (the CUDA context is current)."""
        import tensorrt as trt

        cuda = self.cuda
        self.runtime = trt.Runtime(_logger())
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError("TensorRT could not deserialize the engine (its log above says "
                            "why): rebuild it on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        self.input_name = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)
        _, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
        in_shape = tuple(int(d) for d in tuple(max_shape))  # (max_batch, C, H, W)
        out_tail = tuple(int(d) for d in tuple(self.engine.get_tensor_shape(
            self.output_name))[1:])
        in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.host_in = cuda.pagelocked_empty(in_shape, in_dtype)
        self.host_out = cuda.pagelocked_empty((in_shape[0], *out_tail), out_dtype)
        self.device_in = cuda.mem_alloc(self.host_in.nbytes)
        self.device_out = cuda.mem_alloc(self.host_out.nbytes)
        self.stream = cuda.Stream()
        self.context.set_tensor_address(self.input_name, int(self.device_in))
        self.context.set_tensor_address(self.output_name, int(self.device_out))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        self.meta.check_batch(n)
        cuda = self.cuda
        self.cuda_context.push()
        try:
            self.host_in[:n] = batch  # casts to the engine's input dtype
            cuda.memcpy_htod_async(self.device_in, self.host_in[:n], self.stream)
            if not self.context.set_input_shape(self.input_name, tuple(batch.shape)):
                raise UserError(f"TensorRT rejected input shape {tuple(batch.shape)}")
            if not self.context.execute_async_v3(self.stream.handle):
                raise UserError("TensorRT failed to run the engine (its log above says why)")
            cuda.memcpy_dtoh_async(self.host_out[:n], self.device_out, self.stream)
            self.stream.synchronize()
        finally:
            cuda.Context.pop()
        return np.array(self.host_out[:n], dtype=np.float32)

    def input_metadata(self) -> InputMetadata:
        return self.meta

    def close(self) -> None:
        if getattr(self, "cuda_context", None) is None:
            return
        self.cuda_context.push()
        try:
            self.device_in.free()
            self.device_out.free()
            self.context = self.engine = self.runtime = None  # before the CUDA context goes
        finally:
            self.cuda.Context.pop()
            self.cuda_context.detach()
            self.cuda_context = None


class TensorRtBackend(Backend):
    name = "tensorrt"
    install_hint = INSTALL_HINT
    device = "gpu"
    qdq_target = "tensorrt"
    fixed_batch_range = True

    def available(self) -> bool:
        return _available()

    def version(self) -> str:
        import tensorrt as trt

        return trt.__version__

    def device_info(self) -> dict[str, str]:
        cuda = _cuda_driver()
        device = cuda.Device(0)
        major, minor = device.compute_capability()
        return {"gpu": device.name(), "gpu_compute_capability": f"{major}.{minor}"}

    def build(self, graph: onnx.ModelProto, engine_dir: Path, *, max_batch: int = 64,
              threads: int | None = None) -> list[str]:
        plan = build_plan(graph.SerializeToString(), max_batch=max_batch)
        (Path(engine_dir) / ARTIFACT).write_bytes(plan)
        return [ARTIFACT]

    def rewrite_graph(self, graph: onnx.ModelProto) -> onnx.ModelProto:
        # one LRN layer over [2N, C/2, H, W] (TensorRT's LRN takes any 4-D tensor) instead of
        # Split / two LRNs / Concat; exact, but not built or timed on a GPU here
        from alexnet_deploy.rewrite import lrn_fold_towers

        return lrn_fold_towers(graph)

    def check_compatible(self, sidecar: Any) -> None:
        built, here = sidecar.backend_version, self.version()
        if built != here:
            raise UserError(f"engine was built with TensorRT {built}; this machine has TensorRT "
                            f"{here}, and TensorRT plans only load in the exact version that "
                            "built them: rebuild the engine here")
        built_cc = sidecar.host.get("gpu_compute_capability")
        here_cc = self.device_info()["gpu_compute_capability"]
        if built_cc and built_cc != here_cc:
            raise UserError(f"engine was built for a GPU of compute capability {built_cc} "
                            f"({sidecar.host.get('gpu', '?')}); this GPU is {here_cc}: rebuild "
                            "the engine here")

    def load(self, engine_dir: Path, sidecar: Any, *, threads: int | None = None) -> Runner:
        plan = (Path(engine_dir) / ARTIFACT).read_bytes()
        meta = InputMetadata(name=sidecar.input_name, chw=tuple(sidecar.input_shape),
                             min_batch=sidecar.min_batch, max_batch=sidecar.max_batch)
        try:
            return TensorRtRunner(plan, meta)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot load TensorRT engine {engine_dir} ({first_line(e)})") from e


@functools.lru_cache(maxsize=1)
def _available() -> bool:
    """True when tensorrt imports (its native libraries load) and pycuda finds a CUDA GPU."""
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("pycuda") is None:
        return False
    try:
        import tensorrt  # noqa: F401  (loads libnvinfer)

        _cuda_driver()
    except Exception:  # noqa: BLE001 - ImportError, OSError (no .so), pycuda errors (no driver)
        return False
    return True


BACKEND = TensorRtBackend()
