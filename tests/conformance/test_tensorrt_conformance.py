"""The TensorRT backend against strict fakes generated from the real TensorRT 10.16 and 11.4
Python bindings, with a pycuda model that keeps pycuda's context rules (see ``tensorrt_api.py``,
``pycuda_model.py``). Nothing here runs TensorRT or CUDA: what is checked is that every call the
build and runner code make exists, with these argument types, in each real version, and that
the runner frees everything it allocates, from one thread or many."""

from __future__ import annotations

import json
import threading

import numpy as np
import onnx
import pytest

from alexnet_deploy.backends import InputMetadata
from alexnet_deploy.backends import tensorrt as trt_backend
from alexnet_deploy.errors import UserError

from .simulation import CHW, NUM_CLASSES

META = InputMetadata("input", CHW)


def expected_logits(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).sum(1, keepdims=True) * np.arange(1, NUM_CLASSES + 1)


def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *CHW)).astype(np.float32)


def assert_nothing_leaked(env) -> None:
    assert env.cuda.live == {}, f"still allocated: {sorted(env.cuda.live.values())}"
    assert env.cuda.leaked == [], f"leaked: {env.cuda.leaked}"
    assert env.cuda.stack() == [], "a CUDA context was left current on this thread"
    assert env.sim.contexts_alive == 0


# ---- build ----

def test_build_makes_valid_calls_for_this_version(env):
    plan = trt_backend.build_plan(b"ONNXBYTES", max_batch=32)
    names = [c[0] for c in env.sim.calls]
    assert names[:4] == ["Builder", "builder.create_network", "OnnxParser", "parser.parse"]
    assert names[-1] == "builder.build_serialized_network"
    flags = {c[0]: c[1:] for c in env.sim.calls}["builder.create_network"][0]
    v11 = env.trt.__version__.startswith("11.")
    assert flags == (0 if v11 else 1 << int(env.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    clears = [c[1] for c in env.sim.calls if c[0] == "config.clear_flag"]
    assert clears == [env.trt.BuilderFlag.TF32]
    assert isinstance(plan, bytes) and b'"profile"' in plan


def test_one_logger_for_builds_and_runtimes(env):
    plan = trt_backend.build_plan(b"ONNX", max_batch=8)
    a = trt_backend.TensorRtRunner(plan, META)
    b = trt_backend.TensorRtRunner(plan, META)
    trt_backend.build_plan(b"ONNX", max_batch=8)
    a.close()
    b.close()
    assert len(env.sim.loggers) == 1


def test_parse_errors_are_one_user_error(api, monkeypatch):
    from .conftest import install

    install(monkeypatch, api, parse_errors=[(3, "lrn1.lrn0", "LRN", "Unsupported size=4")])
    with pytest.raises(UserError, match=r"node lrn1.lrn0 \(LRN\): Unsupported size=4"):
        trt_backend.build_plan(b"ONNX", max_batch=4)


def test_builder_that_returns_nullptr_is_a_user_error(api, monkeypatch):
    from .conftest import install

    install(monkeypatch, api, builder_fails=True)
    with pytest.raises(UserError, match="could not create a builder"):
        trt_backend.build_plan(b"ONNX", max_batch=4)


def test_real_bindings_without_a_gpu_give_a_user_error(api):
    """The real bindings over the stub libraries: trt.Builder returns nullptr there, as on a
    machine without a usable GPU. build_plan must say so in one UserError line."""
    from .tensorrt_api import run_with_real_bindings

    code = ("from alexnet_deploy.backends.tensorrt import build_plan, logger\n"
            "from alexnet_deploy.errors import UserError\n"
            "assert logger() is logger()\n"
            "try:\n    build_plan(b'ONNX', max_batch=4)\n"
            "except UserError as e:\n    print('USERERROR', e)\n")
    run = run_with_real_bindings(api["version"], code)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"USERERROR TensorRT {api['version']} could not create a builder" in run.stdout


# ---- runner ----

def test_runner_runs_batches_and_frees_everything(env):
    plan = trt_backend.build_plan(b"ONNX", max_batch=8)
    runner = trt_backend.TensorRtRunner(plan, META)
    assert runner.input_metadata() == InputMetadata("input", CHW, min_batch=1, max_batch=8)
    for n in (1, 5, 8):
        x = batch(n, seed=n)
        np.testing.assert_allclose(runner.infer(x), expected_logits(x), rtol=1e-5)
    with pytest.raises(UserError, match=r"outside this engine's profile \(1..8\)"):
        runner.infer(batch(9))
    assert env.cuda.stack() == []  # every call pops what it pushed
    runner.close()
    runner.close()  # twice is harmless
    assert_nothing_leaked(env)
    with pytest.raises(UserError, match="closed"):
        runner.infer(batch(1))


def test_runner_refuses_a_plan_it_cannot_deserialize(env):
    with pytest.raises(UserError, match="could not deserialize"):
        trt_backend.TensorRtRunner(b"JUNK", META)
    assert_nothing_leaked(env)


def test_lifecycle_create_infer_close_20_times_leaks_nothing(env):
    plan = trt_backend.build_plan(b"ONNX", max_batch=8)
    for i in range(20):
        runner = trt_backend.TensorRtRunner(plan, META)
        x = batch(4, seed=i)
        np.testing.assert_allclose(runner.infer(x), expected_logits(x), rtol=1e-5)
        runner.close()
        assert env.cuda.live == {} and env.cuda.leaked == [], f"round {i}"
    assert env.cuda.primary_retains == 1  # retained once per process, never detached
    assert_nothing_leaked(env)


def test_the_lifecycle_test_catches_the_old_close_order(env):
    """The order ``close()`` used before: pop, detach the context, then let the buffers go.
    The pycuda model reports their frees as leaks, so the lifecycle test above would fail."""
    plan = trt_backend.build_plan(b"ONNX", max_batch=8)
    runner = trt_backend.TensorRtRunner(plan, META)
    runner.infer(batch(2))
    slots = runner._slots
    runner._slots = runner._idle = []
    runner.cuda_context.detach()  # what the old close() did after popping
    for slot in slots:
        for buf in (slot.device_in, slot.device_out, slot.host_in.base, slot.host_out.base):
            buf.free()
    del slots, slot, buf
    assert {kind for kind, _, _ in env.cuda.leaked} >= {"device allocation",
                                                        "pinned host allocation"}


def test_runner_is_safe_from_many_threads(env):
    plan = trt_backend.build_plan(b"ONNX", max_batch=8)
    runner = trt_backend.TensorRtRunner(plan, META)
    inputs = [batch(1 + i % 8, seed=i) for i in range(32)]
    single = [runner.infer(x) for x in inputs]
    results: dict = {}
    errors: list = []
    start = threading.Barrier(4)

    def work(t: int) -> None:
        try:
            start.wait()
            for m in range(25):
                i = (t * 7 + m) % len(inputs)
                results[t, m] = (i, runner.infer(inputs[i]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            assert env.cuda.stack() == []  # this thread's stack

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 100
    for i, out in results.values():
        np.testing.assert_array_equal(out, single[i])
    assert 1 <= len(runner._slots) <= 4
    runner.close()
    assert_nothing_leaked(env)


# ---- the self-test: the fakes catch what the real bindings reject ----

def test_self_test_planted_mistakes_are_caught(env, api):
    from .tensorrt_api import make_fake

    trt = env.trt
    # enums are distinct types, not ints
    assert trt.TensorIOMode.INPUT != 1 and trt.TensorIOMode.INPUT == trt.TensorIOMode.INPUT
    # a wrong argument type: an int where an enum goes; an int severity for Logger
    config = trt.Builder(trt.Logger()).create_builder_config()
    with pytest.raises(TypeError, match="incompatible function arguments"):
        config.set_memory_pool_limit(0, 1 << 20)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        trt.Logger(2)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        config.clear_flag(trt.MemoryPoolType.WORKSPACE)
    # a read-only property; an attribute the bindings do not have
    network = trt.Builder(trt.Logger()).create_network(0)
    with pytest.raises(AttributeError):
        network.num_inputs = 2
    with pytest.raises(AttributeError):
        network.no_such_attribute = 1
    # removed APIs: build_engine left in TensorRT 10; FP16/INT8 builder flags in 11
    assert not hasattr(trt.Builder(trt.Logger()), "build_engine")
    if trt.__version__.startswith("11."):
        assert not hasattr(trt.BuilderFlag, "FP16")
    else:
        assert hasattr(trt.BuilderFlag, "FP16")
    # and a method removed from the API: the real build code fails on it
    edited = {**api, "classes": {**api["classes"], "IBuilderConfig": {
        **api["classes"]["IBuilderConfig"], "methods": {
            k: v for k, v in api["classes"]["IBuilderConfig"]["methods"].items()
            if k != "set_memory_pool_limit"}}}}
    import sys

    holder: list = []
    broken = make_fake(edited, env.sim.behaviours(holder, env.cuda))
    holder.append(broken)
    sys.modules["tensorrt"] = broken  # restored by the fixture's monkeypatch
    with pytest.raises(AttributeError, match="set_memory_pool_limit"):
        trt_backend.build_plan(b"ONNX", max_batch=4)


# ---- version and GPU checks ----

class _Sidecar:
    def __init__(self, version: str, cc: str | None):
        self.backend_version = version
        self.host = {"gpu": "NVIDIA A100", **({"gpu_compute_capability": cc} if cc else {})}


def test_engines_from_another_tensorrt_or_gpu_are_refused(env):
    backend = trt_backend.BACKEND
    here = env.trt.__version__
    backend.check_compatible(_Sidecar(here, "9.0"))  # same version, same GPU
    with pytest.raises(UserError, match=f"built with TensorRT 10.3.0.26; this machine has "
                                        f"TensorRT {here}"):
        backend.check_compatible(_Sidecar("10.3.0.26", "9.0"))
    with pytest.raises(UserError, match="compute capability 8.0 .*this GPU is 9.0"):
        backend.check_compatible(_Sidecar(here, "8.0"))
    assert backend.device_info() == {"gpu": "NVIDIA H100 80GB HBM3",
                                     "gpu_compute_capability": "9.0"}


# ---- the optimization profile and the timing cache ----

@pytest.mark.parametrize("lo, hi, opt", [(1, 64, 8), (1, 1, 1), (1, 256, 16), (4, 8, 4),
                                         (1, 8, 2), (32, 64, 32)])
def test_default_opt_batch_is_the_log_middle_of_the_range(lo, hi, opt):
    assert trt_backend.default_opt_batch(lo, hi) == opt


def test_profile_min_opt_max_reach_the_plan_and_the_runner(env):
    plan = trt_backend.build_plan(b"ONNX", min_batch=2, max_batch=64)
    shapes = next(c[2:] for c in env.sim.calls if c[0] == "profile.set_shape")
    assert shapes == ((2, *CHW), (8, *CHW), (64, *CHW))  # sqrt(2 x 64) = 2^3.5 -> 8
    runner = trt_backend.TensorRtRunner(plan, META)
    assert (runner.input_metadata().min_batch, runner.input_metadata().max_batch) == (2, 64)
    runner.close()


def test_timing_cache_is_written_then_read_and_ignored_from_another_gpu(env, tmp_path):
    device = {"gpu": "NVIDIA H100 80GB HBM3", "gpu_compute_capability": "9.0"}
    cache = trt_backend.TimingCache(tmp_path / "t.cache", device)
    said: list[str] = []
    trt_backend.build_plan(b"ONNX", max_batch=8, timing_cache=cache, say=said.append)
    assert said == []
    first = (tmp_path / "t.cache").read_bytes()
    assert json.loads((tmp_path / "t.cache.json").read_text()) == {
        "tensorrt": env.trt.__version__, **device}
    env.sim.calls.clear()
    trt_backend.build_plan(b"ONNX", max_batch=8, timing_cache=cache, say=said.append)
    assert ("config.create_timing_cache", first) in env.sim.calls  # the cache was read
    assert said == []
    other = trt_backend.TimingCache(tmp_path / "t.cache", {**device, "gpu": "NVIDIA A100"})
    env.sim.calls.clear()
    trt_backend.build_plan(b"ONNX", max_batch=8, timing_cache=other, say=said.append)
    assert ("config.create_timing_cache", b"") in env.sim.calls  # ignored ...
    assert len(said) == 1 and "is from TensorRT" in said[0] and "NVIDIA A100" in said[0]
    assert json.loads((tmp_path / "t.cache.json").read_text())["gpu"] == "NVIDIA A100"  # replaced


def test_build_engine_records_the_profile_and_cache_in_the_sidecar(env, small_model, tmp_path):
    from alexnet_deploy.build import build_engine
    from alexnet_deploy.engine import load_engine, read_sidecar

    result = build_engine(small_model["onnx"], "fp32", tmp_path / "e", backend="tensorrt",
                          max_batch=64, progress=False)
    sidecar = read_sidecar(tmp_path / "e")
    assert (sidecar.min_batch, sidecar.opt_batch, sidecar.max_batch) == (1, 8, 64)
    assert sidecar.timing_cache == str(tmp_path / "cache" / "tensorrt-timing.cache")
    assert (tmp_path / "cache" / "tensorrt-timing.cache").exists()
    assert any("tuned for 8" in line for line in result.summary())
    with load_engine(tmp_path / "e") as engine:
        x = batch(3)
        np.testing.assert_allclose(engine.infer(x), expected_logits(x), rtol=1e-5)
    assert_nothing_leaked(env)
    with pytest.raises(UserError, match="--opt-batch must be between"):
        build_engine(small_model["onnx"], "fp32", tmp_path / "f", backend="tensorrt",
                     max_batch=8, opt_batch=16)


# ---- bench: transfers, the stage split ----

def test_timings_split_each_call_and_no_transfers_keeps_inputs_resident(env):
    plan = trt_backend.build_plan(b"ONNX", max_batch=8)
    runner = trt_backend.TensorRtRunner(plan, META)
    assert runner.capabilities >= {"no_transfers", "stage_timings"}
    x = batch(4)
    runner.infer(x)
    t = runner.timings()
    assert set(t) == {"h2d", "compute", "d2h", "enqueue"} and all(v >= 0 for v in t.values())
    runner.set_transfers(False)
    allocations = env.cuda.live_of("device allocation")
    inputs = [batch(4, seed=s) for s in range(3)]
    for _ in range(3):
        for xi in inputs:
            assert runner.infer(xi).shape == (0, NUM_CLASSES)  # logits stay on the device
    assert env.cuda.live_of("device allocation") == allocations + 3  # one upload per input
    assert set(runner.timings()) == {"compute", "enqueue"}
    # the resident input is what the engine ran on
    runner.set_transfers(True)
    np.testing.assert_allclose(runner.infer(inputs[1]), expected_logits(inputs[1]), rtol=1e-5)
    runner.close()
    assert_nothing_leaked(env)


def test_bench_reports_the_stage_split_for_tensorrt(env):
    from alexnet_deploy.bench import BenchTarget, bench_runners

    runner = trt_backend.TensorRtRunner(trt_backend.build_plan(b"ONNX", max_batch=8), META)
    try:
        (res,) = bench_runners([BenchTarget("trt", runner, backend="tensorrt")], [1, 8],
                               iterations=4, warmup=0.001, data="random", progress=False)
    finally:
        runner.close()
    assert set(res.results[1].stages_ms) == {"h2d", "compute", "d2h", "enqueue"}
    assert res.results[1].stages_ms["compute"].count == 4
    assert res.notes == [("host-device transfers included (H2D + D2H inside each call); no CUDA "
                          "graphs (every call launches its work anew)")]
    assert_nothing_leaked(env)


# ---- INT8 with FP16 elsewhere ----

def test_int8_engines_default_to_fp16_elsewhere_on_tensorrt(env, small_model, tmp_path):
    from alexnet_deploy.build import build_engine

    built = []
    real = trt_backend.build_plan

    def spy(onnx_bytes, **kw):
        built.append(onnx.load_from_string(onnx_bytes))
        return real(onnx_bytes, **kw)

    trt_backend.build_plan = spy
    try:
        a = build_engine(small_model["onnx"], "int8", tmp_path / "a", backend="tensorrt",
                         calibration=small_model["calibration"], max_batch=8, progress=False)
        b = build_engine(small_model["onnx"], "int8", tmp_path / "b", backend="tensorrt",
                         calibration=small_model["calibration"], max_batch=8, progress=False,
                         int8_fallback="fp32")
    finally:
        trt_backend.build_plan = real
    fallback = [{p.key: p.value for p in g.metadata_props}.get("alexnet_deploy.int8_fallback")
                for g in built]
    assert fallback == ['"fp16"', None]
    assert a.sidecar.precision == "int8" and set(a.sidecar.layer_precision.values()) == {"int8"}
    assert any("INT8 with FP16 elsewhere" in n for n in a.sidecar.notes)
    assert not any("FP16 elsewhere" in n for n in b.sidecar.notes)


def test_fp16_fallback_is_refused_on_cpu_backends(small_model, tmp_path):
    from alexnet_deploy.build import build_engine

    with pytest.raises(UserError, match="--int8-fallback fp16 is a TensorRT setting"):
        build_engine(small_model["onnx"], "int8", tmp_path / "c", backend="onnxruntime",
                     calibration=small_model["calibration"], int8_fallback="fp16")
