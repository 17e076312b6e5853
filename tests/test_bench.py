"""bench: statistics, JSON shape, interleaving, budgets, inputs, and the CLI's bad-input lines."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from alexnet_deploy import bench
from alexnet_deploy.backends import InputMetadata, Runner
from alexnet_deploy.bench import (
    BatchResult,
    BenchResult,
    BenchTarget,
    InputPool,
    LatencyStats,
    bench_runners,
    interleave_order,
    percentile_nearest_rank,
    to_json,
)
from alexnet_deploy.cli import cli
from alexnet_deploy.errors import UserError

CHW = (3, 8, 8)


class FakeRunner(Runner):
    """Sleeps ``ms`` per call and logs every call (name, time, batch) into a shared list."""

    def __init__(self, name: str, log: list, ms: float = 0.5, max_batch: int | None = None):
        self.name, self.log, self.ms, self.max_batch = name, log, ms, max_batch
        self.closed = False

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.log.append((self.name, time.perf_counter(), batch))
        time.sleep(self.ms / 1e3)
        return np.ones((batch.shape[0], 4), np.float32)

    def input_metadata(self) -> InputMetadata:
        return InputMetadata("input", CHW, max_batch=self.max_batch)

    def close(self) -> None:
        self.closed = True


def quiet(**kw):
    return dict(progress=False, host="test-host", **kw)


# ---- statistics ----

def test_nearest_rank_percentiles_on_known_lists():
    one_to_100 = list(range(100, 0, -1))  # unsorted on purpose
    assert [percentile_nearest_rank(one_to_100, p) for p in (50, 90, 95, 99, 100)] == \
        [50, 90, 95, 99, 100]
    assert percentile_nearest_rank([1, 2, 3, 4], 50) == 2
    assert percentile_nearest_rank([1, 2, 3, 4], 90) == 4
    assert percentile_nearest_rank([7.5], 99) == 7.5
    with pytest.raises(ValueError):
        percentile_nearest_rank([], 50)


def test_nearest_rank_matches_numpy_inverted_cdf():
    x = np.random.default_rng(1).exponential(3.0, size=997)
    for p in (50, 90, 95, 99):
        assert percentile_nearest_rank(x, p) == pytest.approx(
            np.percentile(x, p, method="inverted_cdf"))


def test_latency_stats_fields():
    s = LatencyStats.from_ms([4.0, 1.0, 3.0, 2.0, 10.0])
    assert (s.min, s.p50, s.p90, s.p99, s.max, s.count) == (1.0, 3.0, 10.0, 10.0, 10.0, 5)
    assert s.mean == pytest.approx(4.0)
    assert list(s.to_dict()) == ["min", "p50", "p90", "p95", "p99", "max"]


def test_throughput_is_images_over_timed_wall_time():
    r = BatchResult(batch_size=8, iterations=100, timed_s=2.0,
                    latency_ms=LatencyStats.from_ms([20.0]))
    assert r.throughput == pytest.approx(400.0)


# ---- JSON ----

def _result(name, tps, batch_sizes=(1, 16)):
    res = BenchResult(name=name, backend="onnxruntime", precision="int8", host="h")
    for b in batch_sizes:
        res.results.append(BatchResult(b, iterations=10, timed_s=10 * b / tps,
                                       latency_ms=LatencyStats.from_ms([1000 * b / tps] * 10)))
    return res


def test_json_single_engine_shape():
    doc = to_json([_result("engines/int8", 200.0)])
    assert list(doc) == ["engine", "backend", "precision", "host", "results"]
    assert doc["engine"] == "engines/int8" and doc["backend"] == "onnxruntime"
    first = doc["results"][0]
    assert first["batch_size"] == 1 and first["throughput"] == pytest.approx(200.0)
    assert set(first["latency_ms"]) == {"min", "p50", "p90", "p95", "p99", "max"}
    assert first["latency_ms"]["p50"] == pytest.approx(5.0)
    json.dumps(doc)  # serializable


def test_json_several_engines_shape_and_ratios():
    doc = to_json([_result("fp32", 100.0), _result("int8", 250.0)])
    assert list(doc) == ["host", "engines", "ratios"]
    assert [e["engine"] for e in doc["engines"]] == ["fp32", "int8"]
    assert all(list(e) == ["engine", "backend", "precision", "host", "results"]
               for e in doc["engines"])
    int8_16 = next(r for r in doc["ratios"] if r["engine"] == "int8" and r["batch_size"] == 16)
    assert int8_16["baseline"] == "fp32"
    assert int8_16["throughput"] == pytest.approx(2.5)
    assert int8_16["p50"] == pytest.approx(0.4)
    assert all(r["throughput"] == 1.0 for r in doc["ratios"] if r["engine"] == "fp32")


# ---- the measurement ----

def test_interleave_order_alternates():
    assert interleave_order(3, 3) == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]


def test_several_runners_are_interleaved():
    log: list = []
    runners = [("A", FakeRunner("A", log, 0.2)), ("B", FakeRunner("B", log, 0.2))]
    results = bench_runners(runners, [2], iterations=6, warmup=0.005, **quiet())
    timed = "".join(name for name, _, _ in log[-12:])
    assert timed == "ABBAABBAABBA"  # one call per round (6 rounds), alternating order
    warm = "".join(name for name, _, _ in log[:-12])
    assert warm == "A" * warm.count("A") + "B" * warm.count("B")  # warm-up: A then B, untimed
    assert [r.results[0].iterations for r in results] == [6, 6]


def test_iterations_count_exactly_and_stats_cover_them():
    log: list = []
    (res,) = bench_runners({"A": FakeRunner("A", log, 0.1)}, [1, 4], iterations=25,
                           warmup=0.005, **quiet())
    assert [r.iterations for r in res.results] == [25, 25]
    assert all(r.latency_ms.count == 25 for r in res.results)
    for r in res.results:
        # every timed call is inside the timed wall time: sum(latency) <= wall time
        assert r.latency_ms.mean * r.iterations / 1e3 <= r.timed_s + 1e-6
        assert r.throughput == pytest.approx(r.batch_size * 25 / r.timed_s)


def test_duration_and_warmup_are_honoured():
    log: list = []
    start = time.perf_counter()
    res = bench_runners([("A", FakeRunner("A", log, 1.0)), ("B", FakeRunner("B", log, 3.0))],
                        [2], duration=0.4, warmup=0.15, **quiet())
    wall = time.perf_counter() - start
    for r in res:
        timed_s = r.results[0].timed_s
        # the last call starts before the budget runs out: one call past it at most (measured
        # by the call's own latency, not a wall-clock bound that a loaded machine would break)
        slowest_s = r.results[0].latency_ms.max / 1e3
        assert 0.4 <= timed_s <= 0.4 + slowest_s + 0.05, (timed_s, slowest_s)
    a_calls = [t for name, t, _ in log if name == "A"]
    b_calls = [t for name, t, _ in log if name == "B"]
    assert b_calls[0] - a_calls[0] >= 0.15  # A warmed up for 0.15 s before B started
    assert wall >= 2 * (0.4 + 0.15)
    # the slow runner did fewer calls in the same time, and its latency says so
    assert res[1].results[0].iterations < res[0].results[0].iterations
    assert res[1].results[0].latency_ms.p50 > 2 * res[0].results[0].latency_ms.p50


@pytest.mark.parametrize("data", [None, "random"])
def test_inputs_are_never_zeros_and_rotate(data):
    log: list = []
    (res,) = bench_runners([("A", FakeRunner("A", log, 0.05))], [3], iterations=12,
                           warmup=0.005, data=data, **quiet())
    assert ("synthetic:test" if data is None else "random N(0, 1)") in res.inputs
    batches = [b for _, _, b in log]
    assert all(b.dtype == np.float32 and b.shape == (3, *CHW) for b in batches)
    assert all(np.any(b) for b in batches)
    assert all(b.flags["C_CONTIGUOUS"] for b in batches)
    distinct = {b.tobytes() for b in batches}
    assert 2 <= len(distinct) <= bench.MAX_BUFFERS
    assert abs(float(np.mean(batches[0]))) < 0.5 and 0.5 < float(np.std(batches[0])) < 1.5


def test_input_pool_uses_given_images_and_refuses_zeros():
    images = np.random.default_rng(0).standard_normal((5, *CHW)).astype(np.float32)
    pool = InputPool(images)
    batches = pool.batches(CHW, None, 4)
    assert all(np.isin(b[:, 0, 0, 0], images[:, 0, 0, 0]).all() for b in batches)
    with pytest.raises(UserError, match="zeros"):
        InputPool(np.zeros((4, *CHW), np.float32)).batches(CHW, None, 2)
    with pytest.raises(UserError, match="shape"):
        InputPool(images).batches((3, 9, 9), None, 2)


def test_batch_outside_profile_names_the_range():
    log: list = []
    with pytest.raises(UserError, match=r"batch size 8 is outside .*\(1\.\.4\)"):
        bench_runners([("A", FakeRunner("A", log, max_batch=4))], [1, 8], iterations=1,
                      warmup=0.01, **quiet())
    assert log == []  # refused before anything ran


@pytest.mark.parametrize("kw, match", [
    ({"duration": 0.0}, "--duration"), ({"duration": -1.0}, "--duration"),
    ({"iterations": 0}, "--iterations"), ({"warmup": 0.0}, "--warmup"),
    ({"warmup": -2.0}, "--warmup"),
])
def test_bad_budgets_are_refused(kw, match):
    with pytest.raises(UserError, match=match):
        bench_runners([("A", FakeRunner("A", []))], [1], **{"warmup": 0.01, **kw}, **quiet())


def test_no_transfers_warns_once_per_cpu_runner():
    warnings: list[str] = []
    res = bench_runners([BenchTarget("A", FakeRunner("A", []), backend="onnxruntime")], [1],
                        iterations=2, warmup=0.005, transfers=False,
                        warn=warnings.append, **quiet())
    assert len(warnings) == 1 and "--no-transfers does not apply to A" in warnings[0]
    assert "\n" not in warnings[0] and res[0].notes == warnings


def test_gpu_runner_capabilities_are_used():
    class GpuFake(FakeRunner):
        capabilities = frozenset({"no_transfers", "stage_timings"})
        asked = None

        def set_transfers(self, transfers):
            GpuFake.asked = transfers

        def timings(self):
            return {"h2d": 0.1, "compute": 0.3, "d2h": 0.05, "enqueue": 0.02}

    class Undeclared(FakeRunner):  # a timings() without the capability is not called
        def timings(self):
            raise AssertionError("called")

    res, other = bench_runners([("G", GpuFake("G", [])), ("U", Undeclared("U", []))], [2],
                               iterations=5, warmup=0.005, transfers=False, **quiet())
    assert GpuFake.asked is False
    stages = res.results[0].stages_ms
    assert stages["compute"].p50 == pytest.approx(0.3) and stages["compute"].count == 5
    assert stages["enqueue"].p50 == pytest.approx(0.02)
    assert "stages_ms" in res.results[0].to_dict() and other.results[0].stages_ms == {}
    assert res.notes == [("transfers excluded (--no-transfers: inputs resident on the device, "
                          "logits not copied back); no CUDA graphs (every call launches its "
                          "work anew)")]


def test_unique_names():
    assert bench.unique_names(["e", "f", "e"]) == ["e #1", "f", "e #2"]


# ---- a real ONNX Runtime engine ----

@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory) -> Path:
    """A real ONNX Runtime FP32 engine of a tiny paper AlexNet (67 px, 3 classes), batch 1..4."""
    from alexnet_deploy.backends.onnxruntime import BACKEND
    from alexnet_deploy.engine import EngineSidecar, write_sidecar
    from alexnet_deploy.export import build_graph
    from alexnet_deploy.fileio import sha256_file
    from alexnet_deploy.model import AlexNetConfig, AlexNetGrouped
    from alexnet_deploy.preprocess import PreprocessSpec

    cfg = AlexNetConfig(num_classes=3, image_size=67, width_mult=0.0625)
    folder = tmp_path_factory.mktemp("engines") / "tiny"
    folder.mkdir()
    files = BACKEND.build(build_graph(AlexNetGrouped(cfg).eval()), folder)
    write_sidecar(folder, EngineSidecar(
        backend="onnxruntime", backend_version=BACKEND.version(), precision="fp32",
        layer_precision={}, artifacts={f: sha256_file(folder / f) for f in files},
        preprocess=PreprocessSpec.for_size(67), classes=["a", "b", "c"],
        input_shape=(3, 67, 67), max_batch=4))
    return folder


def invoke(*args: str):
    return CliRunner().invoke(cli, ["bench", *args])


def test_cli_bench_two_engines_writes_json_and_report(tiny_engine, tmp_path):
    out = invoke("--engine", str(tiny_engine), "--engine", str(tiny_engine), "--batch-sizes",
                 "1,4", "--duration", "0.2", "--warmup", "0.05", "--threads", "1",
                 "--data", "random", "--json", str(tmp_path / "b.json"), "--report",
                 str(tmp_path / "r.md"))
    assert out.exit_code == 0, out.output
    doc = json.loads((tmp_path / "b.json").read_text())
    assert [e["engine"] for e in doc["engines"]] == [f"{tiny_engine} #1", f"{tiny_engine} #2"]
    assert doc["engines"][0]["backend"] == "onnxruntime"
    assert doc["engines"][0]["precision"] == "fp32"
    assert [r["batch_size"] for r in doc["engines"][0]["results"]] == [1, 4]
    assert all(r["throughput"] > 0 for e in doc["engines"] for r in e["results"])
    for png in ("r-throughput.png", "r-latency.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "img/s" in out.output and "x first" in out.output


def test_cli_single_engine_json_and_cpu_flag_warning(tiny_engine, tmp_path):
    out = invoke("--engine", str(tiny_engine), "--batch-sizes", "2", "--iterations", "3",
                 "--warmup", "0.02", "--no-transfers", "--json", str(tmp_path / "b.json"))
    assert out.exit_code == 0, out.output
    assert "warning: --no-transfers does not apply" in out.stderr
    doc = json.loads((tmp_path / "b.json").read_text())
    assert list(doc) == ["engine", "backend", "precision", "host", "results"]
    assert doc["results"][0]["iterations"] == 3


def test_cli_reference_on_cpu(tmp_path):
    import torch

    from alexnet_deploy.checkpoint import save_checkpoint
    from alexnet_deploy.model import AlexNetConfig, build_model
    from alexnet_deploy.preprocess import PreprocessSpec

    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only reference modes")
    cfg = AlexNetConfig(num_classes=3, image_size=67, width_mult=0.0625)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, model=build_model(cfg), config=cfg,
                    preprocess=PreprocessSpec.for_size(67), classes=["a", "b", "c"])
    out = invoke("--reference", str(ckpt), "--batch-sizes", "2", "--iterations", "2",
                 "--warmup", "0.02", "--data", "random", "--json", str(tmp_path / "r.json"))
    assert out.exit_code == 0, out.output
    assert "eager FP32 only" in out.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["backend"] == "pytorch-eager" and doc["precision"] == "fp32"


def _one_error_line(out, *fragments: str) -> None:
    assert out.exit_code == 2, out.output
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_cli_bad_inputs(tiny_engine, tmp_path):
    not_engine = tmp_path / "empty"
    not_engine.mkdir()
    common = ["--iterations", "1", "--warmup", "0.01"]
    _one_error_line(invoke("--engine", str(tmp_path / "nope"), *common), "does not exist")
    _one_error_line(invoke("--engine", str(not_engine), *common), "not an engine")
    _one_error_line(invoke("--engine", str(tiny_engine), "--batch-sizes", "2,8", *common),
                    "batch size 8", "(1..4)")
    _one_error_line(invoke("--engine", str(tiny_engine), "--batch-sizes", "0", *common),
                    "--batch-sizes")
    _one_error_line(invoke("--engine", str(tiny_engine), "--batch-sizes", "x", *common),
                    "--batch-sizes")
    for bad in (["--duration", "0"], ["--duration", "-3"], ["--iterations", "0"],
                ["--warmup", "0"], ["--warmup", "-1"], ["--duration", "1", "--iterations", "2"],
                ["--threads", "0"]):
        _one_error_line(invoke("--engine", str(tiny_engine), *bad), bad[0])
    _one_error_line(invoke("--engine", str(tiny_engine), *common, "--report",
                           "/dev/null/r.md"), "--report", "/dev/null is a file, not a folder")
    _one_error_line(invoke("--engine", str(tiny_engine), *common, "--report", str(tmp_path)),
                    "is a folder")
    _one_error_line(invoke("--engine", str(tiny_engine), *common, "--json",
                           "/dev/null/b.json"), "--json")
    _one_error_line(invoke(*common), "nothing to bench")


def test_cli_closes_runners_when_bench_fails(monkeypatch):
    log: list = []
    runner = FakeRunner("A", log, max_batch=1)

    engine = SimpleNamespace(sidecar={"backend": "fake", "precision": "fp32"}, runner=runner)
    monkeypatch.setattr("alexnet_deploy.bench.load_engine", lambda path, threads=None: engine)
    out = invoke("--engine", "whatever", "--batch-sizes", "2", "--iterations", "1")
    _one_error_line(out, "whatever", "(1..1)")
    assert runner.closed
