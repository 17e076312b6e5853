"""TensorRT on an NVIDIA GPU (TensorRT 10 and 11, Python API), buffers and streams from pycuda.

Untested on real hardware: this project's development machines have no GPU, and TensorRT's native
libraries cannot be installed there, so nothing in this module has been run against a real
TensorRT or a real CUDA driver. What is checked there (``tests/conformance/``): the build and
runner code run end to end against strict fakes generated, at test time, from the real
``tensorrt-cu12-bindings`` 10.16.1.11 and ``tensorrt-cu13-bindings`` 11.4.0.106 (every name,
argument type, enum and read-only property as the bindings define them), with a model of
pycuda 2026.1's context rules (per-thread context stacks; frees in a detached context leak);
and the module imports without ``tensorrt`` or ``pycuda``.

Install on a GPU machine (:data:`INSTALL_HINT`): ``pip install tensorrt pycuda --extra-index-url
https://pypi.nvidia.com``. ``tensorrt`` resolves to the CUDA 13 build (``tensorrt-cu13``); a
machine whose driver supports only CUDA 12 needs ``tensorrt-cu12``. The native libraries
(``tensorrt-cu1N-libs``) come from NVIDIA's index, not PyPI proper. pycuda has no wheels: it
compiles from source and needs the CUDA toolkit (``nvcc``, ``cuda.h``), not only the driver. Or
run inside the NGC TensorRT container (``nvcr.io/nvidia/tensorrt``) and ``pip install pycuda``
there.

Precision comes from the ONNX graph, never from builder flags. TensorRT 11 networks are always
strongly typed: ``BuilderFlag.FP16``/``INT8`` and the INT8 calibrators are gone. TensorRT 10 gets
the same behaviour from ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (:func:`network_flags`;
TensorRT 11 deprecates that flag and ignores it, so it is not passed there). So FP16 is an FP16
ONNX graph (:func:`alexnet_deploy.quantize.to_fp16`) and INT8 is a Q/DQ graph with the TensorRT
placement and, by default, FP16 everywhere it does not quantize
(:func:`alexnet_deploy.quantize.to_int8_fp16`; ``build --int8-fallback fp32``:
:func:`alexnet_deploy.quantize.to_int8` with ``target="tensorrt"``).
``BuilderFlag.TF32`` is cleared, so FP32 tensors compute in FP32 (TensorRT enables TF32 by
default).

Build (one ``trt.Logger`` per process, :func:`logger`)::

    builder = trt.Builder(logger())
    network = builder.create_network(network_flags(trt))     # strongly typed
    parser  = trt.OnnxParser(network, logger); parser.parse(onnx_bytes)   # errors surfaced
    config  = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    profile = builder.create_optimization_profile()
    profile.set_shape(input, (min, C, H, W), (opt, C, H, W), (max, C, H, W))
    config.add_optimization_profile(profile)
    config.set_timing_cache(config.create_timing_cache(previous cache or b""), False)
    plan    = builder.build_serialized_network(network, config)            -> model.engine
    config.get_timing_cache().serialize()                                  -> the cache file

Run: ``trt.Runtime(logger()).deserialize_cuda_engine(plan)``; per call in flight one execution
context with its own CUDA stream and pinned/device buffers (:class:`TensorRtRunner`);
``set_input_shape`` and ``execute_async_v3(stream.handle)`` between pinned-memory host<->device
copies. CUDA work runs in device 0's primary context, retained once per process and never
detached (:func:`primary_context`), the same context PyTorch and TensorRT's runtime API use.

A plan is tied to the exact TensorRT version and to the GPU's compute capability: an engine built
with another TensorRT version, or on a GPU of another compute capability, is refused at load with
a message saying to rebuild it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alexnet_deploy.backends import Backend, InputMetadata, Runner, first_line
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import atomic_path, write_json_atomic
from alexnet_deploy.rewrite import lrn_fold_towers

if TYPE_CHECKING:
    import onnx

ARTIFACT = "model.engine"
INSTALL_HINT = (
    "on a machine with an NVIDIA GPU, pip install tensorrt pycuda --extra-index-url "
    "https://pypi.nvidia.com (tensorrt is the CUDA 13 build: with a CUDA 12 driver install "
    "tensorrt-cu12 instead; the native libraries come from NVIDIA's index; pycuda compiles from "
    "source and needs the CUDA toolkit: nvcc and cuda.h), or use the NGC TensorRT container")
WORKSPACE_BYTES = 1 << 30  # builder scratch memory; AlexNet's largest tactic needs far less


_STATE_LOCK = threading.Lock()
_LOGGER: tuple[Any, Any] | None = None  # (tensorrt module, its one trt.Logger)
_PRIMARY: tuple[Any, Any] | None = None  # (pycuda.driver, device 0's retained primary context)


def logger() -> Any:
    """The process's one ``trt.Logger`` (severity WARNING), made on first use.

    TensorRT keeps one logger per process and warns when a second one is passed while another
    Builder or Runtime lives (``bench`` loads several engines at once), so every Builder,
    OnnxParser and Runtime here shares this one.
    """
    global _LOGGER
    import tensorrt as trt

    with _STATE_LOCK:
        if _LOGGER is None or _LOGGER[0] is not trt:  # a re-imported module gets its own
            _LOGGER = (trt, trt.Logger(trt.Logger.WARNING))
        return _LOGGER[1]


def _cuda_driver():
    """``pycuda.driver``, initialized. Raises when there is no CUDA driver or no GPU."""
    import pycuda.driver as cuda

    cuda.init()
    if cuda.Device.count() < 1:
        raise RuntimeError("no CUDA device")
    return cuda


def primary_context() -> tuple[Any, Any]:
    """``(pycuda.driver, context)``: device 0's primary context, retained once per process and
    never detached (what ``pycuda.autoprimaryctx`` does, without keeping it current).

    The primary context is the one the CUDA runtime API, and so TensorRT and PyTorch, use on
    that device. Detaching it while pycuda objects made in it live makes their later frees
    no-ops (pycuda skips clean-up in a dead context): the memory leaks. Kept retained, every
    buffer can be freed at any time by pushing it (:func:`current`).
    """
    global _PRIMARY
    with _STATE_LOCK:
        if _PRIMARY is None or _PRIMARY[0] is not sys.modules.get("pycuda.driver"):
            cuda = _cuda_driver()
            _PRIMARY = (cuda, cuda.Device(0).retain_primary_context())
        return _PRIMARY


@contextlib.contextmanager
def current(context: Any) -> Iterator[None]:
    """Make the pycuda ``context`` current on this thread for the block, then pop it (CUDA's
    context stack is per thread, so each thread pushes its own)."""
    context.push()
    try:
        yield
    finally:
        type(context).pop()


def network_flags(trt: Any) -> int:
    """``create_network`` flags for a strongly typed network: the ``STRONGLY_TYPED`` bit on
    TensorRT 10; 0 on TensorRT 11 and later, where every network is strongly typed and the flag
    is deprecated (accepted and ignored)."""
    if int(trt.__version__.split(".", 1)[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


@dataclass
class TimingCache:
    """A TensorRT timing cache file and what it belongs to.

    TensorRT stores the measured speed of every tactic it tried in the cache, so a later build
    of the same layers skips timing them. A cache belongs to one TensorRT version and one GPU
    model: the JSON file beside it (``PATH.json``) records both, and a cache that belongs to
    another is ignored with a warning (and replaced by this build's).

    Args:
        path: the cache file (read if present, then written).
        device: this GPU, ``{"gpu": name, "gpu_compute_capability": "X.Y"}``.
    """

    path: Path
    device: dict[str, str]

    def owner(self, version: str) -> dict[str, str]:
        return {"tensorrt": version, **self.device}

    def load(self, version: str, say: Callable[[str], None]) -> bytes:
        """The cache's bytes when it belongs to this TensorRT and GPU, else ``b""``."""
        meta_path = self.path.with_name(self.path.name + ".json")
        if not self.path.exists():
            return b""
        try:
            meta = json.loads(meta_path.read_text())
            blob = self.path.read_bytes()
        except (OSError, ValueError) as e:
            say(f"timing cache {self.path} is unreadable ({first_line(e)}): ignored, this build "
                "times every tactic and replaces it")
            return b""
        if meta != self.owner(version):
            say(f"timing cache {self.path} is from TensorRT {meta.get('tensorrt', '?')} on "
                f"{meta.get('gpu', '?')}; this is TensorRT {version} on "
                f"{self.device.get('gpu', '?')}: ignored, this build times every tactic and "
                "replaces it")
            return b""
        return blob

    def save(self, blob: bytes, version: str, say: Callable[[str], None]) -> None:

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(blob)
            write_json_atomic(self.path.with_name(self.path.name + ".json"),
                              self.owner(version))
        except (OSError, UserError) as e:
            say(f"timing cache {self.path} not written ({first_line(e)}); the engine is fine")


def default_opt_batch(min_batch: int, max_batch: int) -> int:
    """The batch a profile is tuned for when none is given: the power of two nearest the
    geometric mean of ``min_batch`` and ``max_batch`` (1..64 -> 8; ties go down), clamped to
    the range.

    TensorRT picks each layer's kernels for the ``opt`` shape only; other batches run those
    same kernels. Tuning for the largest batch makes batch-1 latency run on kernels chosen for
    it; tuning for 1 does the same to throughput. The middle, on a log scale, costs both least.
    """
    if not 1 <= min_batch <= max_batch:
        raise UserError(f"batch range {min_batch}..{max_batch} is empty: need "
                        "1 <= --min-batch <= --max-batch")
    # ties go down (1..8 -> 2, not 4): the smaller batch keeps latency kernels
    middle = 2 ** math.ceil(math.log2(math.sqrt(min_batch * max_batch)) - 0.5)
    return max(min_batch, min(max_batch, middle))


def default_timing_cache() -> Path:
    """``$ALEXNET_DEPLOY_CACHE/tensorrt-timing.cache``, the cache folder defaulting to
    ``~/.cache/alexnet-deploy``: one cache shared by every build of this user."""
    base = os.environ.get("ALEXNET_DEPLOY_CACHE") or Path.home() / ".cache" / "alexnet-deploy"
    return Path(base) / "tensorrt-timing.cache"


def build_plan(onnx_bytes: bytes, *, max_batch: int, min_batch: int = 1,
               opt_batch: int | None = None, workspace: int = WORKSPACE_BYTES,
               timing_cache: TimingCache | None = None,
               say: Callable[[str], None] | None = None) -> bytes:
    """Parse an ONNX model into a strongly typed network and build a serialized plan with one
    optimization profile.

    Args:
        onnx_bytes: the serialized ONNX graph (precision already applied).
        max_batch: largest batch of the profile.
        min_batch: smallest batch of the profile. Defaults to 1.
        opt_batch: the batch TensorRT chooses kernels for. Defaults to
            :func:`default_opt_batch` of ``min_batch`` and ``max_batch``.
        workspace: builder scratch memory in bytes. Defaults to 1 GiB.
        timing_cache: read before and written after the build. Defaults to None (no cache).
        say: where warnings go (a cache that belongs to another TensorRT or GPU). Defaults to
            dropping them.

    Raises:
        UserError: TensorRT cannot make a builder, parse the model or build the plan.
    """
    import tensorrt as trt

    say = say or (lambda msg: None)
    opt_batch = default_opt_batch(min_batch, max_batch) if opt_batch is None else opt_batch
    builder = _make(trt.Builder, "a builder")
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger())
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
    profile.set_shape(tensor.name, (min_batch, *chw), (opt_batch, *chw), (max_batch, *chw))
    config.add_optimization_profile(profile)
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.load(trt.__version__, say))
        if not config.set_timing_cache(cache, False):  # TensorRT's own check refused it too
            say(f"TensorRT refused timing cache {timing_cache.path}: ignored")
            config.set_timing_cache(config.create_timing_cache(b""), False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT {trt.__version__} failed to build the engine (its log above "
                        "says why); try a smaller --max-batch")
    if timing_cache is not None:
        timing_cache.save(bytes(config.get_timing_cache().serialize()), trt.__version__, say)
    return bytes(plan)


def _make(factory: Any, what: str) -> Any:
    """``factory(logger())``, with TensorRT's failure (pybind11's ``TypeError: factory function
    returned nullptr``: no usable GPU or driver, or CUDA out of memory) as a UserError."""
    import tensorrt as trt

    try:
        return factory(logger())
    except TypeError as e:
        raise UserError(f"TensorRT {trt.__version__} could not create {what} ({first_line(e)}): "
                        "check that a GPU is visible (nvidia-smi) and that the driver supports "
                        "this TensorRT's CUDA version") from e


class _Slot:
    """What one call in flight needs: an execution context of the shared engine, a CUDA stream,
    and pinned host + device buffers for the profile's largest batch, bound to the context.
    Made and released with the CUDA context current."""

    def __init__(self, cuda: Any, engine: Any, io: dict[str, Any]) -> None:
        self.context = engine.create_execution_context()
        if self.context is None:
            raise UserError("TensorRT could not create an execution context (out of GPU "
                            "memory?): close other engines or rebuild with a smaller --max-batch")
        self.stream = None
        self.host_in = self.host_out = self.device_in = self.device_out = None
        self.events: list[Any] = []
        self.resident: dict[int, tuple[np.ndarray, Any]] = {}  # id(batch) -> (batch, device)
        self.bound_input = 0
        try:
            self.stream = cuda.Stream()
            self.events = [cuda.Event() for _ in range(4)]  # before/after H2D, compute, D2H
            self.host_in = cuda.pagelocked_empty(io["in_shape"], io["in_dtype"])
            self.host_out = cuda.pagelocked_empty(io["out_shape"], io["out_dtype"])
            self.device_in = cuda.mem_alloc(self.host_in.nbytes)
            self.device_out = cuda.mem_alloc(self.host_out.nbytes)
            self.context.set_tensor_address(io["input"], int(self.device_in))
            self.context.set_tensor_address(io["output"], int(self.device_out))
            self.bound_input = int(self.device_in)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Wait for the stream, then free everything, in reverse order of creation (the CUDA
        context is current, so pycuda really frees: see :func:`primary_context`)."""
        if self.stream is not None:
            self.stream.synchronize()
        self.context = None  # the execution context goes before the memory bound to it
        for _, buf in self.resident.values():
            buf.free()
        self.resident = {}
        self.events = []  # pycuda destroys them here, in the current context
        for buf in (self.device_out, self.device_in):
            if buf is not None:
                buf.free()
        for host in (self.host_out, self.host_in):
            if host is not None:
                host.base.free()  # pagelocked_empty's array: base is its HostAllocation
        self.host_in = self.host_out = self.device_in = self.device_out = None
        self.stream = None  # pycuda destroys the stream here, in the current context

    def upload_once(self, cuda: Any, batch: np.ndarray) -> int:
        """The device address of ``batch``, uploaded on first sight and kept resident
        (``--no-transfers``); the batch is referenced so its id stays its own."""
        known = self.resident.get(id(batch))
        if known is None:
            n = batch.shape[0]
            self.host_in[:n] = batch
            device = cuda.mem_alloc(self.host_in[:n].nbytes)
            cuda.memcpy_htod_async(device, self.host_in[:n], self.stream)
            known = self.resident[id(batch)] = (batch, device)
        return int(known[1])


class TensorRtRunner(Runner):
    """Runs a deserialized plan on device 0, in its primary context (:func:`primary_context`).

    Thread safety: :meth:`infer` is safe to call from several threads at once. The engine is
    shared; each call in flight takes a slot -- its own TensorRT execution context, CUDA stream
    and pinned/device buffers for the profile's largest batch -- from a pool, and gives it back
    when done. The pool grows to the largest number of simultaneous callers (each slot costs
    the context's activation memory plus about twice the largest batch in host and device
    memory) and keeps its slots until :meth:`close`. A lock guards only the pool, never the
    GPU work, so threads overlap on the GPU. :meth:`close` must not race :meth:`infer`.

    For ``bench`` (:attr:`capabilities`): :meth:`set_transfers` (``False``: each distinct input
    stays resident on the device after its first upload, and the logits stay there) and
    :meth:`timings` (H2D, compute and D2H from CUDA events recorded on the call's stream, and
    the host time of ``execute_async_v3``). No CUDA graphs: pycuda 2026.1 cannot capture a
    stream.

    Args:
        plan: the serialized engine (``model.engine``).
        meta: what the sidecar says the input is; the runner reports the plan's own profile.
    """

    capabilities = frozenset({"no_transfers", "stage_timings"})

    def __init__(self, plan: bytes, meta: InputMetadata) -> None:
        self.cuda, self.cuda_context = primary_context()
        self._transfers = True
        self._local = threading.local()  # each thread's last timings
        self._pool_lock = threading.Lock()
        self._idle: list[_Slot] = []
        self._slots: list[_Slot] = []
        self.engine = self.runtime = None
        with current(self.cuda_context):
            try:
                self._setup(plan)
                self._idle.append(self._new_slot())  # the first slot: errors surface at load
            except BaseException:
                self._release()
                raise
        max_batch = self._io["in_shape"][0]
        self.meta = InputMetadata(name=self.input_name, chw=tuple(self._io["in_shape"][1:]),
                                  min_batch=self._min_batch, max_batch=max_batch)

    def _setup(self, plan: bytes) -> None:
        """Deserialize the plan and read its I/O tensors and profile (the CUDA context is
        current)."""
        import tensorrt as trt

        self.runtime = _make(trt.Runtime, "a runtime")
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UserError("TensorRT could not deserialize the engine (its log above says "
                            "why): rebuild it on this machine")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {n: self.engine.get_tensor_mode(n) for n in names}
        self.input_name = next(n for n in names if modes[n] == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if modes[n] == trt.TensorIOMode.OUTPUT)
        min_shape, _, max_shape = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self._min_batch = int(next(iter(min_shape)))
        in_shape = tuple(int(d) for d in tuple(max_shape))  # (max_batch, C, H, W)
        out_tail = tuple(int(d) for d in tuple(self.engine.get_tensor_shape(
            self.output_name))[1:])
        self._io = {
            "input": self.input_name, "output": self.output_name, "in_shape": in_shape,
            "out_shape": (in_shape[0], *out_tail),
            "in_dtype": np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name))),
            "out_dtype": np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name))),
        }

    def _new_slot(self) -> _Slot:
        slot = _Slot(self.cuda, self.engine, self._io)
        with self._pool_lock:
            self._slots.append(slot)
        return slot

    @contextlib.contextmanager
    def _slot(self) -> Iterator[_Slot]:
        with self._pool_lock:
            if self._slots == [] and self.engine is None:
                raise UserError("this TensorRT engine is closed")
            slot = self._idle.pop() if self._idle else None
        if slot is None:
            slot = self._new_slot()  # the CUDA context is current (infer pushed it)
        try:
            yield slot
        finally:
            with self._pool_lock:
                self._idle.append(slot)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        self.meta.check_batch(n)
        cuda = self.cuda
        with current(self.cuda_context), self._slot() as s:
            ev = s.events
            if self._transfers:
                ev[0].record(s.stream)
                s.host_in[:n] = batch  # casts to the engine's input dtype
                cuda.memcpy_htod_async(s.device_in, s.host_in[:n], s.stream)
                address = int(s.device_in)
            else:
                address = s.upload_once(cuda, batch)
            if address != s.bound_input:
                s.context.set_tensor_address(self.input_name, address)
                s.bound_input = address
            ev[1].record(s.stream)
            if not s.context.set_input_shape(self.input_name, tuple(batch.shape)):
                raise UserError(f"TensorRT rejected input shape {tuple(batch.shape)}")
            t0 = time.perf_counter()
            if not s.context.execute_async_v3(s.stream.handle):
                raise UserError("TensorRT failed to run the engine (its log above says why)")
            enqueue_ms = (time.perf_counter() - t0) * 1e3
            ev[2].record(s.stream)
            if self._transfers:
                cuda.memcpy_dtoh_async(s.host_out[:n], s.device_out, s.stream)
                ev[3].record(s.stream)
            s.stream.synchronize()
            last = {"compute": ev[2].time_since(ev[1]), "enqueue": enqueue_ms}
            if self._transfers:
                last.update(h2d=ev[1].time_since(ev[0]), d2h=ev[3].time_since(ev[2]))
                logits = np.array(s.host_out[:n], dtype=np.float32)
            else:  # the logits stay on the device: nothing to return
                logits = np.empty((0, *s.host_out.shape[1:]), np.float32)
            self._local.last = last
            return logits

    def set_transfers(self, transfers: bool) -> None:
        self._transfers = bool(transfers)

    def timings(self) -> dict[str, float] | None:
        return getattr(self._local, "last", None)

    def input_metadata(self) -> InputMetadata:
        return self.meta

    def _release(self) -> None:
        """Free every slot, then the engine and the runtime (the CUDA context is current)."""
        with self._pool_lock:
            slots, self._slots, self._idle = self._slots, [], []
        for slot in reversed(slots):
            slot.release()
        self.engine = None  # before the runtime that deserialized it
        self.runtime = None

    def close(self) -> None:
        """Release every buffer, stream and execution context while the CUDA context is
        current. The primary context itself stays retained. Safe to call twice."""
        if self.engine is None and not self._slots:
            return
        with current(self.cuda_context):
            self._release()


class TensorRtBackend(Backend):
    name = "tensorrt"
    install_hint = INSTALL_HINT
    device = "gpu"
    qdq_target = "tensorrt"
    fixed_batch_range = True
    default_int8_fallback = "fp16"  # its agreement with FP32: docs/results.md (TensorRT)

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
              threads: int | None = None, min_batch: int = 1, opt_batch: int | None = None,
              timing_cache: Path | None = None,
              say: Callable[[str], None] | None = None) -> list[str]:
        """Write ``model.engine``: the plan for batches ``min_batch..max_batch``, tuned for
        ``opt_batch``, reading and updating the ``timing_cache`` file (None: none). Warnings go
        to ``say``."""
        cache = None if timing_cache is None else TimingCache(Path(timing_cache),
                                                              self.device_info())
        plan = build_plan(graph.SerializeToString(), min_batch=min_batch, opt_batch=opt_batch,
                          max_batch=max_batch, timing_cache=cache, say=say)
        (Path(engine_dir) / ARTIFACT).write_bytes(plan)
        return [ARTIFACT]

    def rewrite_graph(self, graph: onnx.ModelProto) -> onnx.ModelProto:
        # one LRN layer over [2N, C/2, H, W] (TensorRT's LRN takes any 4-D tensor) instead of
        # Split / two LRNs / Concat; exact, but not built or timed on a GPU here

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
