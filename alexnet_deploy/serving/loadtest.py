"""``alexnet-deploy loadtest``: a concurrency sweep against ``alexnet-deploy serve``, in the manner
of Triton's ``perf_analyzer``, with every answer checked.

For each dynamic-batching setting (``on``, ``off``) the engine is served by its own
``alexnet-deploy serve`` child process, all started before the sweep; for each protocol (HTTP,
gRPC, through ``tritonclient``) and each concurrency level C the settings run back to back (in
alternating order from level to level, so that a machine whose load drifts favours neither): C
client threads (one client each) send one preprocessed image per request back to back for
``duration`` seconds, after two untimed requests each. Per level: throughput
(answered requests per second of the level's wall time), client-side latency p50/p95/p99, failed
requests (a Triton or transport error) and wrong answers.

An answer is wrong unless its logits match the engine's own logits for that image (computed in
this process at batch 1 before the server starts) to within ``1e-3 x max(1, max |logit|)``, and
its first label is that image's top-1 class: a request answered with another request's result
(mixed up in a batch) or lost cannot pass. The client threads share the machine's cores with the
server: on a small machine the client's own cost is part of every figure.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alexnet_deploy.bench import LatencyStats, load_images
from alexnet_deploy.engine import host_info, load_engine
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import atomic_path, write_json_atomic, write_text_atomic
from alexnet_deploy.report import Section
from alexnet_deploy.serving import (
    DEFAULT_MAX_QUEUE_DELAY_US,
    DEFAULT_MODEL_NAME,
    TRITON_DTYPES,
)
from alexnet_deploy.serving.handler import Handler
from alexnet_deploy.serving.repository import batch_limits
from alexnet_deploy.serving.server import (
    Ports,
    ServerProcess,
    _require_pytriton,
    free_ports,
    serve_command,
)

PROTOCOLS = ("http", "grpc")
BATCHING = {"on": True, "off": False}
WARMUP_REQUESTS = 2  # untimed requests per client thread before each level
REL_TOL = 1e-3  # logits tolerance, relative to max(1, max |logit|) of the expected answer


@dataclass
class Level:
    """One (batching, protocol, concurrency) level of the sweep."""

    batching: str
    protocol: str
    concurrency: int
    seconds: float
    ok: int
    failed: int
    wrong: int
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_abs_diff: float = 0.0
    first_error: str = ""
    #: CPU seconds the server's processes (serve, tritonserver, backend stubs) used in the
    #: timed runs; None where /proc is not readable
    server_cpu_s: float | None = None
    #: correct answers per second in each round (one entry per timed run of this level)
    round_throughputs: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def throughput(self) -> float:
        """Correctly answered requests (one image each) per second: the median over rounds."""
        if self.round_throughputs:
            return float(np.median(self.round_throughputs))
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_request(self) -> float | None:
        """Server CPU milliseconds per correct answer: what a request costs, whatever else the
        machine runs (less sensitive to other load than req/s)."""
        if self.server_cpu_s is None or not self.ok:
            return None
        return 1e3 * self.server_cpu_s / self.ok

    def add(self, other: Level) -> None:
        """Pool another round of the same level into this one (latency percentiles over all
        requests, counts summed, throughput the median of the rounds')."""
        self.seconds += other.seconds
        self.server_cpu_s = (None if self.server_cpu_s is None or other.server_cpu_s is None
                             else self.server_cpu_s + other.server_cpu_s)
        self.ok, self.failed, self.wrong = (self.ok + other.ok, self.failed + other.failed,
                                            self.wrong + other.wrong)
        self.max_abs_diff = max(self.max_abs_diff, other.max_abs_diff)
        self.first_error = self.first_error or other.first_error
        self.round_throughputs += other.round_throughputs
        self.latencies_ms += other.latencies_ms
        self._percentiles()

    def _percentiles(self) -> None:
        if self.latencies_ms:

            stats = LatencyStats.from_ms(self.latencies_ms)
            self.p50_ms, self.p95_ms, self.p99_ms = stats.p50, stats.p95, stats.p99

    def row(self) -> dict[str, Any]:
        return {"batching": self.batching, "protocol": self.protocol,
                "concurrency": self.concurrency, "req/s": round(self.throughput, 1),
                "p50 ms": self.p50_ms, "p95 ms": self.p95_ms, "p99 ms": self.p99_ms,
                "server CPU ms/req": self.cpu_ms_per_request,
                "ok": self.ok, "failed": self.failed, "wrong": self.wrong}


@dataclass
class LoadTestResult:
    """The whole sweep, with what was served and how."""

    engine: str
    backend: str
    precision: str
    input_shape: tuple[int, ...]
    num_classes: int
    images: int
    duration: float
    rounds: int
    max_queue_delay_us: int
    max_batch: int
    host: dict[str, str]
    levels: list[Level] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(lv.failed == 0 and lv.wrong == 0 for lv in self.levels)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = [{**{k: v for k, v in asdict(lv).items() if k != "latencies_ms"},
                        "throughput": round(lv.throughput, 3),
                        "cpu_ms_per_request": lv.cpu_ms_per_request} for lv in self.levels]
        d["passed"] = self.passed
        return d


class Client:
    """One tritonclient connection (HTTP or gRPC) sending one image per request, as the engine
    takes it (FP32, or UINT8 pixels for a ``uint8-nhwc`` engine)."""

    def __init__(self, protocol: str, port: int, model: str, input_name: str,
                 output_name: str) -> None:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
        self.module, self.model = module, model
        self.input_name, self.output_name = input_name, output_name
        self.client = module.InferenceServerClient(f"localhost:{port}")
        self.outputs = [module.InferRequestedOutput(output_name),
                        module.InferRequestedOutput("labels")]

    def infer(self, image: np.ndarray) -> tuple[np.ndarray, bytes]:
        inp = self.module.InferInput(self.input_name, [1, *image.shape],
                                     TRITON_DTYPES[image.dtype.name])
        inp.set_data_from_numpy(image[None])
        result = self.client.infer(self.model, [inp], outputs=self.outputs)
        return result.as_numpy(self.output_name)[0], result.as_numpy("labels")[0][0]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def check_answer(logits: np.ndarray, label: bytes, expected: np.ndarray,
                 expected_label: bytes) -> float | None:
    """The max |difference| from the expected logits, or None when the answer is wrong."""
    if logits.shape != expected.shape:
        return None
    diff = float(np.max(np.abs(logits.astype(np.float64) - expected)))
    tol = REL_TOL * max(1.0, float(np.max(np.abs(expected))))
    if not diff <= tol or label != expected_label:
        return None
    return diff


def run_level(protocol: str, port: int, concurrency: int, duration: float, images: np.ndarray,
              expected: np.ndarray, expected_labels: Sequence[bytes], *,
              model: str = DEFAULT_MODEL_NAME, input_name: str = "input",
              output_name: str = "logits", batching: str = "on",
              server_group: int | None = None) -> Level:
    """``concurrency`` threads sending ``images`` round robin for ``duration`` seconds; with
    ``server_group`` (the server's process group), the CPU time its processes use meanwhile."""
    n = len(images)
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    counts = np.zeros((concurrency, 3), dtype=np.int64)  # ok, failed, wrong
    worst = np.zeros(concurrency)
    errors: list[str] = []
    times = [0.0, 0.0]  # start, stop: set once every thread has warmed up, before any goes on

    cpu = [0.0]

    def begin() -> None:
        cpu[0] = group_cpu_seconds(server_group)
        times[0] = time.perf_counter()
        times[1] = times[0] + duration

    start = threading.Barrier(concurrency, action=begin)

    def worker(t: int) -> None:
        client = Client(protocol, port, model, input_name, output_name)
        k = t * max(1, n // concurrency)  # threads start at different images
        try:
            for _ in range(WARMUP_REQUESTS):
                with contextlib.suppress(Exception):
                    client.infer(images[k % n])
            start.wait()
            while time.perf_counter() < times[1]:
                i = k % n
                k += 1
                t0 = time.perf_counter()
                try:
                    logits, label = client.infer(images[i])
                except Exception as e:  # noqa: BLE001 - any transport/server error is a failure
                    counts[t, 1] += 1
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                lat[t].append((time.perf_counter() - t0) * 1e3)
                diff = check_answer(logits, label, expected[i], expected_labels[i])
                if diff is None:
                    counts[t, 2] += 1
                else:
                    counts[t, 0] += 1
                    worst[t] = max(worst[t], diff)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(t,), daemon=True)
               for t in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - times[0]
    server_cpu = group_cpu_seconds(server_group) - cpu[0]
    level = Level(batching=batching, protocol=protocol, concurrency=concurrency,
                  seconds=seconds, ok=int(counts[:, 0].sum()), failed=int(counts[:, 1].sum()),
                  wrong=int(counts[:, 2].sum()), max_abs_diff=float(worst.max()),
                  first_error=errors[0][:300] if errors else "",
                  latencies_ms=[x for per in lat for x in per],
                  server_cpu_s=None if np.isnan(server_cpu) else server_cpu)
    level.round_throughputs = [level.ok / seconds]
    level._percentiles()
    return level


def group_cpu_seconds(pgid: int | None) -> float:
    """User + system CPU seconds of the live processes in process group ``pgid`` (from
    ``/proc``; NaN when it cannot be read). Processes that exited in between are not counted:
    a server's processes live as long as the server."""
    if pgid is None:
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        entries = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return float("nan")
    for pid in entries:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # after the command: state ppid pgrp ... utime (12th) stime (13th)
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def _check_options(concurrency: Sequence[int], protocols: Sequence[str],
                   batching: Sequence[str], duration: float, num_images: int,
                   rounds: int = 1) -> None:
    if not concurrency or min(concurrency) < 1:
        raise UserError(f"--concurrency {list(concurrency)}: give levels of 1 or more")
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad or not protocols:
        raise UserError(f"--protocols {list(protocols)}: choose from {', '.join(PROTOCOLS)}")
    bad = [b for b in batching if b not in BATCHING]
    if bad or not batching:
        raise UserError(f"--batching {list(batching)}: choose from on, off")
    if duration <= 0 or num_images < 1:
        raise UserError("--duration must be above 0 and --images at least 1")
    if rounds < 1:
        raise UserError(f"--rounds {rounds} must be at least 1")


def run_loadtest(engine: Path | str, data: str | Path, *,
                 concurrency: Sequence[int] = (1, 2, 4, 8, 16, 32),
                 protocols: Sequence[str] = PROTOCOLS, batching: Sequence[str] = ("on", "off"),
                 duration: float = 3.0, rounds: int = 1, num_images: int = 64,
                 max_batch: int | None = None,
                 max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US,
                 threads: int | None = None, json_path: Path | str | None = None,
                 report_path: Path | str | None = None,
                 say: Callable[[str], None] = print) -> LoadTestResult:
    """Serve ``engine`` and sweep it; return (and optionally write) the results.

    Args:
        engine: the engine folder.
        data: images to send (an image folder or an .npz).
        concurrency: levels of requests in flight. Defaults to 1, 2, 4, 8, 16, 32.
        protocols: ``http`` and/or ``grpc``. Defaults to both.
        batching: ``on`` and/or ``off`` (dynamic batching), each a server of its own. Defaults
            to both.
        duration: timed seconds per level and round. Defaults to 3.
        rounds: times the whole sweep is repeated; each level reports the median throughput
            of its rounds and latency percentiles over all their requests. Defaults to 1.
        num_images: distinct images sent round robin. Defaults to 64.
        max_batch: the server's largest batch. Defaults to None (the engine's, 64 for CPU ones).
        max_queue_delay_us: the dynamic batcher's delay. Defaults to 500.
        threads: CPU threads of the served engine. Defaults to None.
        json_path: write the results as JSON here. Defaults to None.
        report_path: write a markdown report (and a PNG beside it) here. Defaults to None.
        say: progress lines. Defaults to print.
    """

    _require_pytriton()
    concurrency, protocols, batching = list(concurrency), list(protocols), list(batching)
    _check_options(concurrency, protocols, batching, duration, num_images, rounds)
    for option, out in (("--json", json_path), ("--report", report_path)):
        if out is not None and not Path(out).resolve().parent.is_dir():
            raise UserError(f"{option} {out}: its folder does not exist; create it first")
    with load_engine(engine) as loaded:
        side = loaded.sidecar
        max_batch_size, _ = batch_limits(side, max_batch)
        images = load_images(data, side.preprocess, num_images)
        if loaded.takes_uint8:  # send the pixels: a quarter of the bytes (exact conversion)
            images = side.preprocess.denormalize(images)
        expected = np.concatenate([loaded.infer(images[i:i + 1]) for i in range(len(images))])
        labels = Handler(loaded, top_k=1).labels(expected)[:, 0]
        folder = loaded.path
    result = LoadTestResult(engine=str(folder), backend=side.backend, precision=side.precision,
                            input_shape=tuple(side.input_shape), num_classes=side.num_classes,
                            images=len(images), duration=duration, rounds=rounds,
                            max_queue_delay_us=max_queue_delay_us, max_batch=max_batch_size,
                            host=host_info())
    expected = expected.astype(np.float64)
    with tempfile.TemporaryDirectory(prefix="alexnet-loadtest-") as tmp, \
            contextlib.ExitStack() as stack:
        servers: dict[str, Any] = {}
        for setting in batching:  # all servers up at once, so that levels can interleave
            ports = Ports(*free_ports())
            argv = serve_command(folder, ports, max_batch=max_batch_size,
                                 max_queue_delay_us=max_queue_delay_us, threads=threads,
                                 no_batching=not BATCHING[setting])
            say(f"dynamic batching {setting}: starting a server")
            server = stack.enter_context(ServerProcess(argv, ports, [DEFAULT_MODEL_NAME],
                                                       log=Path(tmp) / f"serve-{setting}.log"))
            servers[setting] = server
        for setting, server in servers.items():
            try:
                server.wait_ready()
            except RuntimeError as e:
                raise UserError(f"the server with dynamic batching {setting} did not start: "
                                f"{e}") from e
        pooled: dict[tuple[str, str, int], Level] = {}
        step = 0
        for r in range(rounds):
            for protocol in protocols:
                for c in concurrency:
                    # the settings side by side at each level, in alternating order (load drifts)
                    order = batching if step % 2 == 0 else batching[::-1]
                    step += 1
                    for setting in order:
                        ports = servers[setting].ports
                        level = run_level(protocol,
                                          ports.http if protocol == "http" else ports.grpc,
                                          c, duration, images, expected, labels,
                                          input_name=side.input_name,
                                          output_name=side.output_name, batching=setting,
                                          server_group=servers[setting].proc.pid)
                        say(f"round {r + 1}/{rounds} {_level_line(level)}")
                        key = (setting, protocol, c)
                        if key in pooled:
                            pooled[key].add(level)
                        else:
                            pooled[key] = level
        result.levels = [pooled[(b, p, c)] for b in batching for p in protocols
                         for c in concurrency]
    if json_path:

        write_json_atomic(json_path, result.to_json())
    if report_path:
        write_loadtest_report(report_path, result)
    return result


def _level_line(lv: Level) -> str:
    p = f"p50 {lv.p50_ms:.1f} p95 {lv.p95_ms:.1f} p99 {lv.p99_ms:.1f} ms" if lv.p50_ms else "-"
    err = f"  first error: {lv.first_error}" if lv.first_error else ""
    cpu = lv.cpu_ms_per_request
    cpu_text = f"  server CPU {cpu:.1f} ms/req" if cpu is not None else ""
    return (f"batching {lv.batching:3s} {lv.protocol:4s} c={lv.concurrency:<3d} "
            f"{lv.throughput:8.1f} req/s  {p}{cpu_text}  ok {lv.ok} failed {lv.failed} "
            f"wrong {lv.wrong}{err}")


def write_loadtest_report(path: Path | str, result: LoadTestResult) -> list[Path]:
    """A markdown table of every level and ``STEM-loadtest.png`` beside it (throughput, p99 and
    server CPU per request against concurrency, one line per protocol and batching setting)."""

    path = Path(path)
    plot = path.with_name(f"{path.stem}-loadtest.png")
    _plot(result, plot)
    ratio_rows = []
    for protocol in dict.fromkeys(lv.protocol for lv in result.levels):
        for c in dict.fromkeys(lv.concurrency for lv in result.levels):
            on = _find(result, "on", protocol, c)
            off = _find(result, "off", protocol, c)
            if on and off and off.throughput > 0:
                ratio_rows.append({"protocol": protocol, "concurrency": c,
                                   "req/s on": round(on.throughput, 1),
                                   "req/s off": round(off.throughput, 1),
                                   "on / off": round(on.throughput / off.throughput, 2),
                                   "p99 on ms": on.p99_ms, "p99 off ms": off.p99_ms,
                                   "CPU ms/req on": on.cpu_ms_per_request,
                                   "CPU ms/req off": off.cpu_ms_per_request})
    c, h, w = result.input_shape
    intro = (f"Engine `{result.engine}` ({result.backend} {result.precision}, input "
             f"{c}x{h}x{w}, {result.num_classes} classes) served by `alexnet-deploy serve` "
             f"(Triton through PyTriton; max batch {result.max_batch}, queue delay "
             f"{result.max_queue_delay_us} us when batching is on). {result.images} distinct "
             f"images, one per request, {result.duration:g} s per level and round, "
             f"{result.rounds} round(s), batching on and off side by side at each level "
             "(req/s: the median over rounds; latency percentiles over all rounds' requests); "
             "every answer checked against the engine's own logits for that image. Server "
             "CPU ms/req: CPU time of the server's processes per correct answer (less "
             f"sensitive than req/s to other work on the machine). Host: {result.host.get('cpu')} "
             f"({result.host.get('hostname')}). Verdict: "
             f"{'no failed or wrong answers' if result.passed else 'FAILED or WRONG answers'}.")
    parts = [f"# Triton load test\n\n{intro}\n"]
    if ratio_rows:
        parts.append(Section("Dynamic batching on vs off", rows=ratio_rows).to_markdown())
    parts.append(Section("Every level", rows=[lv.row() for lv in result.levels]).to_markdown())
    parts.append(f"![throughput, p99 latency and server CPU per request against concurrency]"
                 f"({plot.name})\n")
    write_text_atomic(path, "\n".join(parts))
    return [path, plot]


def _find(result: LoadTestResult, batching: str, protocol: str, c: int) -> Level | None:
    return next((lv for lv in result.levels if (lv.batching, lv.protocol, lv.concurrency)
                 == (batching, protocol, c)), None)


def _plot(result: LoadTestResult, dest: Path) -> None:
    from matplotlib.figure import Figure


    fig = Figure(figsize=(15, 4.2), dpi=110)
    ax_t, ax_p, ax_c = fig.subplots(1, 3)
    for batching in dict.fromkeys(lv.batching for lv in result.levels):
        for protocol in dict.fromkeys(lv.protocol for lv in result.levels):
            lvs = [lv for lv in result.levels if (lv.batching, lv.protocol) == (batching,
                                                                                protocol)]
            if not lvs:
                continue
            xs = [lv.concurrency for lv in lvs]
            style = "-" if batching == "on" else "--"
            look = {"marker": "o" if protocol == "http" else "s",
                    "color": "C0" if protocol == "http" else "C1",
                    "label": f"{protocol}, batching {batching}"}
            ax_t.plot(xs, [lv.throughput for lv in lvs], style, **look)
            ax_p.plot(xs, [lv.p99_ms or np.nan for lv in lvs], style, **look)
            ax_c.plot(xs, [lv.cpu_ms_per_request or np.nan for lv in lvs], style, **look)
    levels = sorted({lv.concurrency for lv in result.levels})
    for ax, ylabel in ((ax_t, "requests / s (one image each)"), (ax_p, "p99 latency (ms)"),
                       (ax_c, "server CPU ms per request")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"Triton load test: {Path(result.engine).name} ({result.backend} "
                 f"{result.precision})")
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
