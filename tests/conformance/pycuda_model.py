"""A model of the parts of pycuda 2026.1 the TensorRT runner uses, with pycuda's context rules.

Written from pycuda 2026.1's sources (``src/cpp/cuda.hpp``, ``src/wrapper/wrap_cudadrv.cpp``,
``pycuda/autoprimaryctx.py``); nothing here runs CUDA. The rules it keeps:

* CUDA's context stack is per thread (pycuda's ``context_stack`` is a thread-specific pointer).
  ``Context.push()`` pushes on the calling thread's stack; ``Context.pop()`` on an empty stack
  raises ``LogicError`` ("cannot pop non-current context").
* ``retain_primary_context()`` returns a context that is *not* pushed; ``detach()`` releases
  it (``cuDevicePrimaryCtxRelease``) and makes the object invalid; detaching an invalid context
  raises.
* Every allocation, pinned host buffer and stream is "context dependent": made in the current
  context (none current: ``LogicError`` "no currently active context?"), and freed through
  ``scoped_context_activation`` of that context. When that context was detached, pycuda skips
  the free silently (``CUDAPP_CATCH_CLEANUP_ON_DEAD_CONTEXT``): the memory leaks. When it is not
  current and belongs to another thread, the free is skipped with a warning: also a leak.
* Freeing twice raises (``CUDA_ERROR_INVALID_HANDLE``); a stream is destroyed when its last
  reference goes, under the same rules.

:class:`PycudaModel` records every live and leaked resource so tests can assert there are none.
"""

from __future__ import annotations

import threading
import types
import warnings
from dataclasses import dataclass, field

import numpy as np


class Error(Exception):
    pass


class LogicError(Error):
    pass


@dataclass
class GpuSpec:
    name: str = "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int] = (9, 0)
    count: int = 1


@dataclass
class PycudaModel:
    """State of the modelled driver: contexts' stacks per thread, live resources, leaks."""

    gpu: GpuSpec = field(default_factory=GpuSpec)
    live: dict = field(default_factory=dict)  # id -> (kind, nbytes)
    leaked: list = field(default_factory=list)  # (kind, nbytes, why)
    memory: dict = field(default_factory=dict)  # device address -> bytearray
    streams: set = field(default_factory=set)  # live stream handles
    primary_retains: int = 0
    initialized: bool = False

    def __post_init__(self) -> None:
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._next = 0x7000_0000

    # ---- helpers for tests ----

    def stack(self) -> list:
        if not hasattr(self._tls, "stack"):
            self._tls.stack = []
        return self._tls.stack

    def live_of(self, kind: str) -> int:
        return sum(1 for k, _ in self.live.values() if k == kind)

    def device_view(self, address: int, dtype, count: int) -> np.ndarray:
        """The device memory at ``address`` as a numpy array (what a kernel would see)."""
        for base, buf in self.memory.items():
            if base <= address < base + len(buf):
                return np.frombuffer(buf, dtype=dtype, count=count, offset=address - base)
        raise LogicError(f"illegal address {address:#x}: not allocated (or freed)")

    def _address(self, nbytes: int) -> int:
        with self._lock:
            address = self._next
            self._next += max(256, (nbytes + 255) // 256 * 256)
            return address

    def modules(self) -> tuple[types.ModuleType, types.ModuleType]:
        """``(pycuda, pycuda.driver)`` modules bound to this model."""
        return _make_modules(self)


def _make_modules(model: PycudaModel) -> tuple[types.ModuleType, types.ModuleType]:
    def current() -> Context | None:
        stack = model.stack()
        while stack:  # pycuda's current_context(): invalid contexts are popped on the way
            if stack[-1].valid:
                return stack[-1]
            stack.pop()
        return None

    def need_init() -> None:
        if not model.initialized:
            raise LogicError("cuInit has not been called")

    class Context:
        def __init__(self, device: int) -> None:
            self.device, self.valid, self.thread = device, True, threading.get_ident()

        def push(self) -> None:
            model.stack().append(self)

        @staticmethod
        def pop() -> None:
            stack = model.stack()
            if not stack:
                raise LogicError("context::pop failed: invalid context - cannot pop "
                                 "non-current context")
            stack.pop()

        @staticmethod
        def get_current() -> Context | None:
            return current()

        def detach(self) -> None:
            if not self.valid:
                raise LogicError("context::detach failed: invalid context - cannot detach "
                                 "from invalid context")
            self.valid = False
            model.primary_retains -= 1
            stack = model.stack()
            if stack and stack[-1] is self:
                stack.pop()  # detaching the active context pops it

        def get_device(self) -> Device:
            return Device(self.device)

    class _Dependent:
        """pycuda's context_dependent: remembers the context current at creation."""

        kind = "resource"

        def __init__(self, nbytes: int) -> None:
            self._register(nbytes)

        def _register(self, nbytes: int) -> None:
            ctx = current()
            if ctx is None:
                raise LogicError("explicit_context_dependent failed: invalid context - no "
                                 "currently active context?")
            self._ctx, self._valid, self.nbytes = ctx, True, nbytes
            model.live[id(self)] = (self.kind, nbytes)

        def _release(self) -> None:
            """``scoped_context_activation`` + the free, with pycuda's dead-context rules."""
            ctx = self._ctx
            model.live.pop(id(self), None)
            self._valid = False
            if not ctx.valid:
                model.leaked.append((self.kind, self.nbytes, "freed in a detached context"))
                return
            if current() is not ctx and threading.get_ident() != ctx.thread:
                warnings.warn(f"{self.kind} in out-of-thread context could not be cleaned up",
                              UserWarning, stacklevel=3)
                model.leaked.append((self.kind, self.nbytes, "freed out of thread"))
                return
            self._freed()

        def _freed(self) -> None:
            pass

        def free(self) -> None:
            if not self._valid:
                raise LogicError(f"{self.kind}::free failed: invalid resource handle")
            self._release()

        def __del__(self) -> None:
            if getattr(self, "_valid", False):
                self._release()

    class DeviceAllocation(_Dependent):
        kind = "device allocation"

        def __init__(self, nbytes: int) -> None:
            super().__init__(nbytes)
            self.address = model._address(nbytes)
            model.memory[self.address] = bytearray(nbytes)

        def __int__(self) -> int:
            if not self._valid:
                raise LogicError("device allocation was freed")
            return self.address

        __index__ = __int__

        def _freed(self) -> None:
            model.memory.pop(self.address, None)

    class HostAllocation(_Dependent, bytearray):
        """Pinned memory; numpy arrays made on it keep it as their ``.base``."""

        kind = "pinned host allocation"

        def __init__(self, nbytes: int) -> None:
            bytearray.__init__(self, nbytes)
            self._register(nbytes)

        __hash__ = object.__hash__

    class Stream(_Dependent):
        kind = "stream"

        def __init__(self, flags: int = 0) -> None:
            super().__init__(0)
            self.handle = model._address(1)
            model.streams.add(self.handle)

        def synchronize(self) -> None:
            _check_current(self._ctx)

        def is_done(self) -> bool:
            return True

        def _freed(self) -> None:
            model.streams.discard(self.handle)

        def free(self) -> None:  # pycuda has no Stream.free: only its destructor
            raise AttributeError("'Stream' object has no attribute 'free'")

    class Event(_Dependent):
        kind = "event"

        def __init__(self, flags: int = 0) -> None:
            super().__init__(0)
            self.time = None

        def record(self, stream: Stream | None = None) -> Event:
            _check_current(self._ctx)
            with model._lock:
                model._next += 1
                self.time = model._next * 1e-3  # ms, strictly increasing
            return self

        def synchronize(self) -> Event:
            return self

        def time_since(self, other: Event) -> float:
            return self.time - other.time

        def time_till(self, other: Event) -> float:
            return other.time - self.time

    def _check_current(ctx: Context | None = None) -> None:
        cur = current()
        if cur is None:
            raise LogicError("invalid context: no CUDA context is current on this thread")
        if ctx is not None and cur is not ctx:
            raise LogicError("invalid context: the resource belongs to another context")

    class Device:
        def __init__(self, number: int) -> None:
            need_init()
            if not 0 <= number < model.gpu.count:
                raise LogicError(f"cuDeviceGet failed: invalid device ordinal {number}")
            self.number = number

        @staticmethod
        def count() -> int:
            need_init()
            return model.gpu.count

        def name(self) -> str:
            return model.gpu.name

        def compute_capability(self) -> tuple[int, int]:
            return model.gpu.compute_capability

        def retain_primary_context(self) -> Context:
            model.primary_retains += 1
            return Context(self.number)

        def make_context(self, flags: int = 0) -> Context:
            ctx = Context(self.number)
            model.primary_retains += 1
            model.stack().append(ctx)
            return ctx

    def init(flags: int = 0) -> None:
        model.initialized = True

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        return DeviceAllocation(int(nbytes))

    def pagelocked_empty(shape, dtype, order: str = "C", mem_flags: int = 0) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        alloc = HostAllocation(int(np.prod(shape)) * dtype.itemsize)
        return np.ndarray(shape, dtype, buffer=alloc, order=order)  # .base is the allocation

    def _stream_ok(stream: Stream | None) -> None:
        _check_current()
        if stream is not None and (not stream._valid or stream.handle not in model.streams):
            raise LogicError("invalid resource handle: the stream was destroyed")

    def memcpy_htod_async(dest, src, stream: Stream | None = None) -> None:
        _stream_ok(stream)
        src = np.ascontiguousarray(src)
        view = model.device_view(int(dest), np.uint8, src.nbytes)
        view[...] = src.view(np.uint8).reshape(-1)

    def memcpy_dtoh_async(dest, src, stream: Stream | None = None) -> None:
        _stream_ok(stream)
        dest.view(np.uint8).reshape(-1)[...] = model.device_view(int(src), np.uint8, dest.nbytes)

    driver = types.ModuleType("pycuda.driver")
    driver.Error, driver.LogicError = Error, LogicError
    driver.init, driver.Device, driver.Context, driver.Stream, driver.Event = (
        init, Device, Context, Stream, Event)
    driver.mem_alloc, driver.pagelocked_empty = mem_alloc, pagelocked_empty
    driver.DeviceAllocation, driver.HostAllocation = DeviceAllocation, HostAllocation
    driver.memcpy_htod_async, driver.memcpy_dtoh_async = memcpy_htod_async, memcpy_dtoh_async
    package = types.ModuleType("pycuda")
    package.driver = driver
    return package, driver
