"""What the strict fake TensorRT does when called: a tiny simulated TensorRT.

The "network" of every plan: ``logits[i, k] = sum(input[i]) * (k + 1)``, read from and written
to the pycuda model's device memory at the addresses bound with ``set_tensor_address``, on a
stream that must be alive. A plan is JSON: the optimization profile, the input shape, the
TensorRT version and the GPU. A timing cache is ``b"TC"`` + JSON of the version and GPU.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tensorrt_api import new

CHW = (3, 67, 67)
NUM_CLASSES = 10


@dataclass
class Simulation:
    """Configuration and record of the simulated TensorRT (see the module docstring)."""

    gpu: str = "9.0"
    parse_errors: list = field(default_factory=list)  # (node, name, op, desc)
    build_fails: bool = False
    builder_fails: bool = False  # trt.Builder(logger) -> nullptr, as without a usable GPU
    loggers: list = field(default_factory=list)
    calls: list = field(default_factory=list)
    contexts_alive: int = 0

    def behaviours(self, trt: Any, cuda_model: Any) -> dict:
        """``"Class.member" -> fn`` for :func:`tensorrt_api.make_fake`; ``trt`` is filled in
        by the caller once the module exists (a one-item list)."""
        sim, lock = self, threading.Lock()

        def record(name, *args):
            with lock:
                sim.calls.append((name, *args))

        def logger_init(self, min_severity=None):
            sim.loggers.append(self)

        def builder_init(self, logger):
            record("Builder")
            if sim.builder_fails:
                raise TypeError("pybind11::init(): factory function returned nullptr")

        def dims(shape):
            return new(trt[0], "Dims", shape=tuple(int(d) for d in shape))

        def create_network(self, flags=0):
            record("builder.create_network", int(flags))
            tensor = new(trt[0], "ITensor", name="input", shape=dims((-1, *CHW)))
            return new(trt[0], "INetworkDefinition", num_inputs=1, tensor=tensor)

        def parse(self, model, path=None):
            record("parser.parse", bytes(model)[:4])
            return not sim.parse_errors

        def get_error(self, index):
            node, name, op, desc = sim.parse_errors[index]
            return new(trt[0], "ParserError", v=(node, name, op, desc))

        def set_shape(self, input, min, opt, max):
            shapes = [tuple(int(d) for d in s) for s in (min, opt, max)]
            record("profile.set_shape", input, *shapes)
            self._state["shapes"] = shapes

        def add_profile(self, profile):
            record("config.add_optimization_profile")
            self._state.setdefault("profiles", []).append(profile._state["shapes"])
            return 0

        def create_timing_cache(self, serialized_timing_cache):
            data = bytes(memoryview(serialized_timing_cache))
            record("config.create_timing_cache", data)
            return new(trt[0], "ITimingCache", data=data or b"TC" + json.dumps(
                {"version": trt[0].__version__, "gpu": sim.gpu, "entries": 0}).encode())

        def set_timing_cache(self, cache, ignore_mismatch):
            meta = json.loads(cache._state["data"][2:])
            record("config.set_timing_cache", bool(ignore_mismatch))
            if (meta["version"], meta["gpu"]) != (trt[0].__version__, sim.gpu) \
                    and not ignore_mismatch:
                return False
            self._state["timing_cache"] = cache
            return True

        def get_timing_cache(self):
            return self._state.get("timing_cache")

        def serialize_cache(self):
            meta = json.loads(self._state["data"][2:])
            meta["entries"] += 1  # the build timed something new
            self._state["data"] = b"TC" + json.dumps(meta).encode()
            return new(trt[0], "IHostMemory", data=self._state["data"])

        def build(self, network, config):
            record("builder.build_serialized_network")
            if sim.build_fails:
                return None
            (lo, opt, hi), = config._state["profiles"]
            plan = {"profile": [lo, opt, hi], "version": trt[0].__version__, "gpu": sim.gpu}
            return new(trt[0], "IHostMemory", data=json.dumps(plan).encode())

        def runtime_init(self, logger):
            record("Runtime")

        def deserialize(self, serialized_engine):
            data = bytes(memoryview(serialized_engine))
            record("runtime.deserialize_cuda_engine")
            try:
                plan = json.loads(data)
            except ValueError:
                return None
            return new(trt[0], "ICudaEngine", plan=plan)

        def tensor_mode(self, name):
            modes = trt[0].TensorIOMode
            return {"input": modes.INPUT, "logits": modes.OUTPUT}.get(name, modes.NONE)

        def profile_shape(self, name, profile_index):
            if profile_index != 0 or name != "input":
                raise RuntimeError(f"no profile {profile_index} for {name}")
            return [dims(s) for s in self._state["plan"]["profile"]]

        def create_context(self, strategy=None, **kw):
            record("engine.create_execution_context")
            with lock:
                sim.contexts_alive += 1
            ctx = new(trt[0], "IExecutionContext", addresses={}, shape=None)
            ctx._state["finalizer"] = _Alive(sim, lock)
            return ctx

        def set_address(self, name, memory):
            self._state["addresses"][name] = int(memory)
            return True

        def set_input_shape(self, name, shape):
            self._state["shape"] = tuple(int(d) for d in shape)
            return True

        def execute(self, stream_handle):
            if int(stream_handle) not in cuda_model.streams:
                raise RuntimeError("execute_async_v3 on a stream that does not exist")
            n = self._state["shape"][0]
            size = int(np.prod(CHW))
            x = cuda_model.device_view(self._state["addresses"]["input"], np.float32, n * size)
            out = cuda_model.device_view(self._state["addresses"]["logits"], np.float32,
                                         n * NUM_CLASSES)
            out[...] = (x.reshape(n, -1).sum(1, keepdims=True)
                        * np.arange(1, NUM_CLASSES + 1)).reshape(-1)
            return True

        def nptype(trt_type):
            return {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8}[trt_type.name]

        def dims_init(self, shape=()):
            self._state["shape"] = tuple(int(d) for d in shape)

        state = lambda key: lambda self: self._state[key]
        return {
            "Logger.__init__": logger_init,
            "Builder.__init__": builder_init,
            "Builder.create_network": create_network,
            "Builder.create_builder_config": lambda self: (
                record("builder.create_builder_config") or new(trt[0], "IBuilderConfig")),
            "Builder.create_optimization_profile": lambda self: new(trt[0],
                                                                    "IOptimizationProfile"),
            "Builder.build_serialized_network": build,
            "OnnxParser.__init__": lambda self, network, logger: record("OnnxParser"),
            "OnnxParser.parse": parse,
            "OnnxParser.num_errors": lambda self: len(sim.parse_errors),
            "OnnxParser.get_error": get_error,
            "ParserError.node": lambda self: self._state["v"][0],
            "ParserError.node_name": lambda self: self._state["v"][1],
            "ParserError.node_operator": lambda self: self._state["v"][2],
            "ParserError.desc": lambda self: self._state["v"][3],
            "INetworkDefinition.num_inputs": state("num_inputs"),
            "INetworkDefinition.get_input": lambda self, index: self._state["tensor"],
            "ITensor.name": state("name"),
            "ITensor.shape": state("shape"),
            "IBuilderConfig.set_memory_pool_limit": lambda self, pool, pool_size: record(
                "config.set_memory_pool_limit", pool, int(pool_size)),
            "IBuilderConfig.clear_flag": lambda self, flag: record("config.clear_flag", flag),
            "IBuilderConfig.add_optimization_profile": add_profile,
            "IBuilderConfig.create_timing_cache": create_timing_cache,
            "IBuilderConfig.set_timing_cache": set_timing_cache,
            "IBuilderConfig.get_timing_cache": get_timing_cache,
            "ITimingCache.serialize": serialize_cache,
            "IOptimizationProfile.set_shape": set_shape,
            "Runtime.__init__": runtime_init,
            "Runtime.deserialize_cuda_engine": deserialize,
            "ICudaEngine.num_io_tensors": lambda self: 2,
            "ICudaEngine.get_tensor_name": lambda self, index: ("input", "logits")[index],
            "ICudaEngine.get_tensor_mode": tensor_mode,
            "ICudaEngine.get_tensor_profile_shape": profile_shape,
            "ICudaEngine.get_tensor_shape": lambda self, name: dims(
                (-1, *CHW) if name == "input" else (-1, NUM_CLASSES)),
            "ICudaEngine.get_tensor_dtype": lambda self, name: trt[0].DataType.FLOAT,
            "ICudaEngine.create_execution_context": create_context,
            "IExecutionContext.set_tensor_address": set_address,
            "IExecutionContext.set_input_shape": set_input_shape,
            "IExecutionContext.execute_async_v3": execute,
            "Dims.__init__": dims_init,
            "Dims.__len__": lambda self: len(self._state["shape"]),
            "Dims.__getitem__": lambda self, arg0: self._state["shape"][arg0],
            "nptype": nptype,
        }


class _Alive:
    """Counts an execution context down when the Python object holding it goes."""

    def __init__(self, sim: Simulation, lock: threading.Lock) -> None:
        self.sim, self.lock = sim, lock

    def __del__(self) -> None:
        with self.lock:
            self.sim.contexts_alive -= 1
