"""The TensorRT backend, as far as it can be checked without a GPU.

Nothing TensorRT runs on the CPU machines this project is developed and tested on. What is
checked here:

* the module imports without ``tensorrt``/``pycuda``, and ``available()`` is False with an
  install hint;
* with fake ``tensorrt`` and ``pycuda`` modules, the calls the builder and the runner make, in
  order, with their arguments. The fakes define only the names (and argument shapes) that exist
  in the real bindings, checked against ``tensorrt_cu12_bindings`` 10.16.1.11 and 11.4.0.106
  and pycuda 2026.1's ``wrap_cudadrv.cpp``, so a misspelt or removed API name fails here with
  AttributeError. Enum values are the real ones (``STRONGLY_TYPED`` is 1 in TensorRT 10 and 0 in
  11, where the flag is deprecated).

Tests marked ``tensorrt`` need a GPU with TensorRT and pycuda and are skipped elsewhere.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from alexnet_deploy.backends import InputMetadata, get_backend
from alexnet_deploy.backends import tensorrt as trt_backend
from alexnet_deploy.errors import UserError

CHW = (3, 67, 67)
NUM_CLASSES = 10


# ---- fake tensorrt ----

class _Enum(int):
    def __new__(cls, value: int, name: str):
        obj = int.__new__(cls, value)
        obj.name = name
        return obj

    def __repr__(self) -> str:
        return self.name


def _enum(**members: int) -> type:
    return type("Enum", (), {k: _Enum(v, k) for k, v in members.items()})


class _ParserError:
    def __init__(self, node: int, name: str, op: str, desc: str) -> None:
        self._v = (node, name, op, desc)

    def node(self) -> int:
        return self._v[0]

    def node_name(self) -> str:
        return self._v[1]

    def node_operator(self) -> str:
        return self._v[2]

    def desc(self) -> str:
        return self._v[3]


def fake_tensorrt(calls: list, version: str = "10.16.1.11", *, parse_errors=(),
                  plan: bytes | None = b"PLAN", device: dict | None = None) -> types.ModuleType:
    """A ``tensorrt`` module whose objects record ``(name, args)`` into ``calls``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    v11 = int(version.split(".")[0]) >= 11
    trt.NetworkDefinitionCreationFlag = _enum(STRONGLY_TYPED=0 if v11 else 1)
    trt.MemoryPoolType = _enum(WORKSPACE=0, TACTIC_SHARED_MEMORY=1)
    flags = {"TF32": 6, "STRICT_NANS": 20} if v11 else {"FP16": 0, "INT8": 1, "TF32": 6}
    trt.BuilderFlag = _enum(**flags)
    trt.TensorIOMode = _enum(NONE=0, INPUT=1, OUTPUT=2)
    trt.DataType = _enum(FLOAT=0, HALF=1)
    trt.nptype = lambda t: {0: np.float32, 1: np.float16}[int(t)]

    class Logger:
        WARNING = _Enum(2, "WARNING")

        def __init__(self, severity):
            calls.append(("Logger", severity))

    class Dims(tuple):
        pass

    class ITensor:
        name = "input"
        shape = Dims((-1, *CHW))

    class INetworkDefinition:
        num_inputs = 1

        def get_input(self, index):
            calls.append(("network.get_input", index))
            return ITensor()

    class OnnxParser:
        def __init__(self, network, logger):
            calls.append(("OnnxParser", type(network).__name__))
            self.num_errors = len(parse_errors)

        def parse(self, model):
            calls.append(("parser.parse", bytes(model)[:4]))
            return not parse_errors

        def get_error(self, index):
            return _ParserError(*parse_errors[index])

    class IOptimizationProfile:
        def set_shape(self, input, min, opt, max):
            calls.append(("profile.set_shape", input, tuple(min), tuple(opt), tuple(max)))

    class IBuilderConfig:
        def set_memory_pool_limit(self, pool, pool_size):
            calls.append(("config.set_memory_pool_limit", pool, pool_size))

        def clear_flag(self, flag):
            calls.append(("config.clear_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("config.add_optimization_profile",))
            return 0

    class Builder:
        def __init__(self, logger):
            calls.append(("Builder",))

        def create_network(self, flags=0):
            calls.append(("builder.create_network", flags))
            return INetworkDefinition()

        def create_builder_config(self):
            calls.append(("builder.create_builder_config",))
            return IBuilderConfig()

        def create_optimization_profile(self):
            calls.append(("builder.create_optimization_profile",))
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            calls.append(("builder.build_serialized_network",))
            return None if plan is None else memoryview(plan)  # IHostMemory: a buffer

    class IExecutionContext:
        def __init__(self):
            self.addresses, self.shape = {}, None

        def set_tensor_address(self, name, memory):
            calls.append(("context.set_tensor_address", name, memory))
            self.addresses[name] = memory
            return True

        def set_input_shape(self, name, shape):
            calls.append(("context.set_input_shape", name, tuple(shape)))
            self.shape = tuple(shape)
            return True

        def execute_async_v3(self, stream_handle):
            calls.append(("context.execute_async_v3", stream_handle))
            # the "network": logits[i, k] = sum(input[i]) * (k + 1), in fake device memory
            n = self.shape[0]
            x = device["memory"][self.addresses["input"]][:n]
            out = device["memory"][self.addresses["logits"]]
            out[:n] = x.reshape(n, -1).sum(1, keepdims=True) * np.arange(1, NUM_CLASSES + 1)
            return True

    class ICudaEngine:
        num_io_tensors = 2

        def get_tensor_name(self, index):
            return ("input", "logits")[index]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "input" else trt.TensorIOMode.OUTPUT

        def get_tensor_profile_shape(self, name, profile_index):
            calls.append(("engine.get_tensor_profile_shape", name, profile_index))
            return [Dims((1, *CHW)), Dims((8, *CHW)), Dims((8, *CHW))]

        def get_tensor_shape(self, name):
            return Dims((-1, NUM_CLASSES))

        def get_tensor_dtype(self, name):
            return trt.DataType.FLOAT

        def create_execution_context(self):
            calls.append(("engine.create_execution_context",))
            return IExecutionContext()

    class Runtime:
        def __init__(self, logger):
            calls.append(("Runtime",))

        def deserialize_cuda_engine(self, serialized_engine):
            calls.append(("runtime.deserialize_cuda_engine", bytes(serialized_engine)))
            return ICudaEngine() if bytes(serialized_engine) == b"PLAN" else None

    for cls in (Logger, Builder, OnnxParser, Runtime):
        setattr(trt, cls.__name__, cls)
    return trt


# ---- fake pycuda ----

def fake_pycuda(calls: list, device: dict) -> tuple[types.ModuleType, types.ModuleType]:
    """``pycuda`` and ``pycuda.driver``; device memory is a dict address -> numpy buffer."""
    driver = types.ModuleType("pycuda.driver")
    device.setdefault("memory", {})

    class DeviceAllocation:
        def __init__(self, nbytes):
            self.address = 0x1000 * (len(device["memory"]) + 1)
            rows = (NUM_CLASSES,) if nbytes == 8 * NUM_CLASSES * 4 else CHW
            device["memory"][self.address] = np.zeros((8, *rows), np.float32)

        def __int__(self):
            return self.address

        def free(self):
            calls.append(("free", self.address))

    class Context:
        @staticmethod
        def pop():
            calls.append(("Context.pop",))

        def push(self):
            calls.append(("context.push",))

        def detach(self):
            calls.append(("context.detach",))

    class Device:
        def __init__(self, number):
            self.number = number

        @staticmethod
        def count():
            return 1

        def name(self):
            return "NVIDIA H100 80GB HBM3"

        def compute_capability(self):
            return (9, 0)

        def retain_primary_context(self):
            calls.append(("retain_primary_context", self.number))
            return Context()

    class Stream:
        handle = 0xBEEF

        def synchronize(self):
            calls.append(("stream.synchronize",))

    def memcpy_htod_async(dest, src, stream=None):
        calls.append(("memcpy_htod_async", int(dest), src.shape, stream.handle))
        device["memory"][int(dest)][:len(src)] = src

    def memcpy_dtoh_async(dest, src, stream=None):
        calls.append(("memcpy_dtoh_async", int(src), dest.shape, stream.handle))
        dest[...] = device["memory"][int(src)][:len(dest)]

    driver.init = lambda flags=0: calls.append(("cuda.init",))
    driver.Device, driver.Context, driver.Stream = Device, Context, Stream
    driver.mem_alloc = DeviceAllocation
    driver.pagelocked_empty = lambda shape, dtype, order="C", mem_flags=0: np.empty(shape, dtype)
    driver.memcpy_htod_async = memcpy_htod_async
    driver.memcpy_dtoh_async = memcpy_dtoh_async
    package = types.ModuleType("pycuda")
    package.driver = driver
    return package, driver


@pytest.fixture
def fakes(monkeypatch):
    """Install fake ``tensorrt`` (10.16) and ``pycuda``; yields ``(calls, install)`` where
    ``install(**kw)`` swaps in a differently configured fake tensorrt."""
    calls: list = []
    device: dict = {}
    pycuda, driver = fake_pycuda(calls, device)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)

    def install(**kw):
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(calls, device=device, **kw))

    install()
    return calls, install


def names(calls: list) -> list[str]:
    return [c[0] for c in calls]


# ---- without TensorRT ----

def test_module_imports_without_tensorrt_or_pycuda(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setitem(sys.modules, "pycuda", None)
    module = importlib.reload(trt_backend)
    try:
        assert module.BACKEND.name == "tensorrt"
        module._available.cache_clear()
        assert module.BACKEND.available() is False
    finally:
        module._available.cache_clear()


def test_not_available_here_says_how_to_install():
    if trt_backend.BACKEND.available():
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(UserError) as e:
        get_backend("tensorrt")
    assert "pip install tensorrt pycuda on a GPU machine, or use the NGC TensorRT container" \
        in str(e.value)


# ---- the builder, against the fake ----

@pytest.mark.parametrize("version, flags", [("10.16.1.11", 1 << 1), ("11.4.0.106", 0)])
def test_build_makes_the_documented_calls_in_order(fakes, version, flags):
    calls, install = fakes
    install(version=version)
    plan = trt_backend.build_plan(b"ONNXBYTES", max_batch=32, workspace=1 << 28)
    assert plan == b"PLAN"
    assert names(calls) == [
        "Logger", "Builder", "builder.create_network", "OnnxParser", "parser.parse",
        "network.get_input", "builder.create_builder_config", "config.set_memory_pool_limit",
        "config.clear_flag", "builder.create_optimization_profile", "profile.set_shape",
        "config.add_optimization_profile", "builder.build_serialized_network"]
    by_name = {c[0]: c for c in calls}
    assert by_name["builder.create_network"] == ("builder.create_network", flags)
    assert by_name["parser.parse"] == ("parser.parse", b"ONNX")
    assert by_name["profile.set_shape"] == ("profile.set_shape", "input", (1, *CHW),
                                            (32, *CHW), (32, *CHW))
    pool = by_name["config.set_memory_pool_limit"]
    assert (pool[1].name, pool[2]) == ("WORKSPACE", 1 << 28)
    assert by_name["config.clear_flag"][1].name == "TF32"


def test_strongly_typed_means_no_precision_builder_flags(fakes):
    calls, _ = fakes
    trt_backend.build_plan(b"ONNX", max_batch=4)
    flags = [c[1].name for c in calls if c[0] == "config.clear_flag"]
    assert flags == ["TF32"]  # and nothing sets FP16 / INT8 (the fake has no set_flag at all)


def test_parse_errors_are_surfaced_with_node_and_reason(fakes):
    _, install = fakes
    install(parse_errors=[(3, "lrn1.lrn0", "LRN", "Unsupported attribute size=4"),
                          (7, "", "Conv", "weights must be an initializer")])
    with pytest.raises(UserError) as e:
        trt_backend.build_plan(b"ONNX", max_batch=4)
    text = str(e.value)
    assert "cannot parse the model" in text
    assert "node lrn1.lrn0 (LRN): Unsupported attribute size=4" in text
    assert "node 7 (Conv): weights must be an initializer" in text


def test_a_failed_build_is_one_line(fakes):
    _, install = fakes
    install(plan=None)
    with pytest.raises(UserError, match="failed to build the engine"):
        trt_backend.build_plan(b"ONNX", max_batch=4)


def test_backend_build_writes_the_plan(fakes, tmp_path):
    model = onnx.ModelProto()
    assert trt_backend.BACKEND.build(model, tmp_path, max_batch=8) == ["model.engine"]
    assert (tmp_path / "model.engine").read_bytes() == b"PLAN"


# ---- the runner, against the fakes ----

def test_runner_binds_buffers_once_and_runs_each_batch_on_one_stream(fakes):
    calls, _ = fakes
    runner = trt_backend.TensorRtRunner(b"PLAN", InputMetadata("input", CHW))
    assert runner.input_metadata() == InputMetadata("input", CHW, min_batch=1, max_batch=8)
    setup = names(calls)
    assert setup[:3] == ["cuda.init", "retain_primary_context", "context.push"]
    assert setup[-3:] == ["context.set_tensor_address", "context.set_tensor_address",
                          "Context.pop"]
    calls.clear()
    x = np.random.default_rng(0).standard_normal((5, *CHW)).astype(np.float32)
    logits = runner.infer(x)
    expected = x.reshape(5, -1).sum(1, keepdims=True) * np.arange(1, NUM_CLASSES + 1)
    np.testing.assert_allclose(logits, expected, rtol=1e-5)
    assert logits.dtype == np.float32 and logits.shape == (5, NUM_CLASSES)
    assert names(calls) == ["context.push", "memcpy_htod_async", "context.set_input_shape",
                            "context.execute_async_v3", "memcpy_dtoh_async", "stream.synchronize",
                            "Context.pop"]
    assert calls[2] == ("context.set_input_shape", "input", (5, *CHW))
    assert calls[3] == ("context.execute_async_v3", 0xBEEF)
    with pytest.raises(UserError, match=r"outside this engine's profile \(1..8\)"):
        runner.infer(np.zeros((9, *CHW), np.float32))
    calls.clear()
    runner.close()
    assert names(calls) == ["context.push", "free", "free", "Context.pop", "context.detach"]


def test_runner_refuses_a_plan_tensorrt_cannot_deserialize(fakes):
    calls, _ = fakes
    with pytest.raises(UserError, match="could not deserialize"):
        trt_backend.TensorRtRunner(b"JUNK", InputMetadata("input", CHW))
    assert names(calls)[-2:] == ["Context.pop", "context.detach"]  # nothing left current


# ---- version and GPU checks ----

class _Sidecar:
    def __init__(self, version: str, cc: str | None):
        self.backend_version = version
        self.host = {"gpu": "NVIDIA A100", **({"gpu_compute_capability": cc} if cc else {})}


def test_engines_from_another_tensorrt_or_gpu_are_refused(fakes):
    backend = trt_backend.BACKEND
    backend.check_compatible(_Sidecar("10.16.1.11", "9.0"))  # same version, same GPU
    with pytest.raises(UserError, match="built with TensorRT 10.3.0.26; this machine has "
                                        "TensorRT 10.16.1.11"):
        backend.check_compatible(_Sidecar("10.3.0.26", "9.0"))
    with pytest.raises(UserError, match="compute capability 8.0 .*this GPU is 9.0"):
        backend.check_compatible(_Sidecar("10.16.1.11", "8.0"))
    assert backend.device_info() == {"gpu": "NVIDIA H100 80GB HBM3",
                                     "gpu_compute_capability": "9.0"}


# ---- on a real GPU ----

@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_tensorrt_engine_matches_onnx_runtime(small_model, tmp_path):
    if not trt_backend.BACKEND.available():
        pytest.skip("needs an NVIDIA GPU with TensorRT and pycuda "
                    f"({trt_backend.INSTALL_HINT})")
    import onnxruntime as ort

    from alexnet_deploy.build import build_engine
    from alexnet_deploy.engine import load_engine

    build_engine(small_model["onnx"], "fp32", tmp_path / "trt", backend="tensorrt", max_batch=8)
    x = np.random.default_rng(0).standard_normal((8, *CHW)).astype(np.float32)
    reference = ort.InferenceSession(str(small_model["onnx"])).run(None, {"input": x})[0]
    with load_engine(tmp_path / "trt") as engine:
        np.testing.assert_allclose(engine.infer(x), reference, atol=1e-3, rtol=1e-3)
    assert Path(tmp_path / "trt" / "model.engine").stat().st_size > 0
