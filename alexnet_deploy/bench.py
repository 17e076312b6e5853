"""Benchmark engines (and the PyTorch reference) the way ``trtexec`` does: warm up, then time.

    alexnet-deploy bench --engine engines/int8                        # batch 1, 8, 32
    alexnet-deploy bench --engine engines/fp32 --engine engines/int8 \\
        --batch-sizes 1,16 --duration 5 --threads 2 --report bench/report.md
    alexnet-deploy bench --engine engines/int8 --reference train/demo/best.pt --json bench.json

Semantics (``docs/bench.md`` has the long form):

* **Per batch size**, every target first runs untimed warm-up calls for ``warmup`` seconds (at
  least one call), then timed calls for ``duration`` seconds or exactly ``iterations`` calls.
* **Latency** is the host wall clock (``time.perf_counter``) around one ``runner.infer(batch)``:
  a float32 NCHW batch in host memory in, logits in host memory out. Statistics: min, p50, p90,
  p95, p99, max in milliseconds; percentiles are nearest-rank (always an observed latency).
* **Throughput** (img/s) = batch size x timed calls / timed wall time, the wall time being the
  sum of the target's timed slices (calls back to back, nothing else inside).
* **Several targets** are interleaved: the timed budget is cut into slices of about
  :data:`SLICE_S` seconds (or at most :data:`ITERATION_ROUNDS` rounds of calls) taken in turn,
  in alternating order (A B C, C B A, A B C, ...), so machine drift hits every target alike.
  Ratios are against the first target.
* **Inputs** are real preprocessed images (``--data``; default the synthetic test split) or
  N(0, 1) random data, never zeros, rotated among several distinct input buffers.
* **GPU runners** declare what they can do in ``Runner.capabilities`` (CPU runners: nothing):
  ``"no_transfers"`` (``--no-transfers`` calls ``runner.set_transfers(False)`` before warm-up)
  and ``"stage_timings"`` (``runner.timings()`` after every timed call: ``h2d``, ``compute``,
  ``d2h`` in ms from CUDA events, plus ``enqueue``, the host time of the launch). On a runner
  without ``"no_transfers"`` the flag does not apply, and bench says so in one line. No runner
  replays CUDA graphs: pycuda 2026.1 has no stream capture (``docs/bench.md``).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from alexnet_deploy.backends import InputMetadata, Runner
from alexnet_deploy.checkpoint import load_checkpoint
from alexnet_deploy.data import iter_batches
from alexnet_deploy.engine import cpu_model, load_engine
from alexnet_deploy.errors import UserError
from alexnet_deploy.fileio import check_output, write_json_atomic
from alexnet_deploy.preprocess import PreprocessSpec
from alexnet_deploy.report import plot_paths, write_report

DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_WARMUP_S = 1.0
DEFAULT_DURATION_S = 3.0
DEFAULT_DATA = "synthetic:test"
SLICE_S = 0.25  # interleaving slice, duration mode
ITERATION_ROUNDS = 12  # interleaving rounds, iterations mode
POOL_IMAGES = 64  # distinct images loaded from --data
BUFFER_BYTES = 256 << 20  # input buffers per batch size stay under this (at least 2 buffers)
MAX_BUFFERS = 4
PERCENTILES = (50, 90, 95, 99)
STAGES = ("h2d", "compute", "d2h", "enqueue")  # what a "stage_timings" runner reports


# ---- results ----

@dataclass(frozen=True)
class LatencyStats:
    """Latency statistics in milliseconds over ``count`` timed calls."""

    min: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    mean: float
    count: int

    @classmethod
    def from_ms(cls, samples_ms: Sequence[float]) -> LatencyStats:
        if len(samples_ms) == 0:
            raise ValueError("no latency samples")
        s = np.sort(np.asarray(samples_ms, dtype=np.float64))
        pct = {p: percentile_nearest_rank(s, p, presorted=True) for p in PERCENTILES}
        return cls(min=float(s[0]), p50=pct[50], p90=pct[90], p95=pct[95], p99=pct[99],
                   max=float(s[-1]), mean=float(s.mean()), count=len(s))

    def to_dict(self) -> dict[str, float]:
        """The six keys of ``latency_ms`` in the JSON output."""
        return {k: round(getattr(self, k), 4) for k in ("min", "p50", "p90", "p95", "p99", "max")}


def percentile_nearest_rank(samples: Sequence[float], p: float, presorted: bool = False) -> float:
    """The nearest-rank ``p``-th percentile: the smallest sample with at least ``p``% of the
    samples at or below it (``sorted[ceil(p/100 * n) - 1]``). Always an observed value.

    ``[1, 2, ..., 100]`` -> p50 = 50, p90 = 90, p99 = 99; ``[5]`` -> 5 for every ``p``.
    """
    s = samples if presorted else np.sort(np.asarray(samples, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise ValueError("no samples")
    rank = max(1, math.ceil(p / 100.0 * n - 1e-9))
    return float(s[min(rank, n) - 1])


@dataclass
class BatchResult:
    """One target at one batch size."""

    batch_size: int
    iterations: int
    timed_s: float  # wall time of the timed calls (sum of slices)
    latency_ms: LatencyStats
    stages_ms: dict[str, LatencyStats] = field(default_factory=dict)  # GPU runners only

    @property
    def throughput(self) -> float:
        """Images per second: batch size x timed calls / timed wall time."""
        return self.batch_size * self.iterations / self.timed_s

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"batch_size": self.batch_size,
                             "throughput": round(self.throughput, 3),
                             "latency_ms": self.latency_ms.to_dict(),
                             "iterations": self.iterations}
        if self.stages_ms:
            d["stages_ms"] = {k: v.to_dict() for k, v in self.stages_ms.items()}
        return d


@dataclass
class BenchResult:
    """One target (engine or reference mode) over all batch sizes."""

    name: str
    backend: str
    precision: str
    backend_version: str = ""
    host: str = ""
    inputs: str = ""  # what the inputs were, in words
    method: str = ""  # warm-up / timing / interleaving, in words
    results: list[BatchResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def at(self, batch_size: int) -> BatchResult | None:
        return next((r for r in self.results if r.batch_size == batch_size), None)

    def to_dict(self) -> dict[str, Any]:
        """The single-engine JSON object (``--json`` with one target)."""
        return {"engine": self.name, "backend": self.backend, "precision": self.precision,
                "host": self.host, "results": [r.to_dict() for r in self.results]}


def ratios(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """Each target against the first at every shared batch size: ``throughput`` = img/s ratio
    (above 1: faster), ``p50`` = median latency ratio (below 1: faster)."""
    if not results:
        return []
    base = results[0]
    rows = []
    for res in results:
        for r in res.results:
            b = base.at(r.batch_size)
            if b is None:
                continue
            rows.append({"engine": res.name, "baseline": base.name, "batch_size": r.batch_size,
                         "throughput": round(r.throughput / b.throughput, 4),
                         "p50": round(r.latency_ms.p50 / b.latency_ms.p50, 4)})
    return rows


def to_json(results: Sequence[BenchResult]) -> dict[str, Any]:
    """The ``--json`` document.

    One target: ``{"engine", "backend", "precision", "host", "results": [{"batch_size",
    "throughput", "latency_ms": {"min", "p50", "p90", "p95", "p99", "max"}, "iterations"}]}``
    (plus ``"stages_ms"`` per result on GPU runners). Several targets: ``{"host", "engines":
    [one such object per target, in order], "ratios": [{"engine", "baseline", "batch_size",
    "throughput", "p50"}]}`` with the first target as baseline.
    """
    results = list(results)
    if not results:
        raise ValueError("no results")
    if len(results) == 1:
        return results[0].to_dict()
    return {"host": results[0].host, "engines": [r.to_dict() for r in results],
            "ratios": ratios(results)}


def write_json(path: Path | str, results: Sequence[BenchResult]) -> None:

    write_json_atomic(path, to_json(results))


# ---- what gets benched ----

@dataclass
class BenchTarget:
    """A runner with the labels a result carries. ``preprocess`` decides how ``--data`` images
    become inputs (None: a default spec of the runner's input size)."""

    name: str
    runner: Runner
    backend: str = "?"
    precision: str = "?"
    backend_version: str = ""
    preprocess: PreprocessSpec | None = None
    input_format: str = "float32-nchw"  # "uint8-nhwc": fed the same images as uint8 pixels

    @classmethod
    def from_engine(cls, engine: Any, name: str) -> BenchTarget:
        """From :func:`alexnet_deploy.engine.load_engine`'s result (``.sidecar``, ``.runner``)."""
        sc = engine.sidecar
        spec = _field(sc, "preprocess", None)
        if isinstance(spec, dict):
            spec = PreprocessSpec.from_dict(spec)
        return cls(name=name, runner=engine.runner, backend=str(_field(sc, "backend", "?")),
                   precision=str(_field(sc, "precision", "?")),
                   backend_version=str(_field(sc, "backend_version", "")), preprocess=spec,
                   input_format=str(_field(sc, "input_format", "float32-nchw")))


def _field(obj: Any, name: str, default: Any) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _as_targets(named_runners: Any) -> list[BenchTarget]:
    if isinstance(named_runners, Mapping):
        items: Iterable[Any] = named_runners.items()
    else:
        items = named_runners
    targets = []
    for item in items:
        if isinstance(item, BenchTarget):
            targets.append(item)
        else:
            name, runner = item
            targets.append(BenchTarget(name=str(name), runner=runner))
    if not targets:
        raise UserError("nothing to bench: pass --engine ENGINE (and/or --reference CHECKPOINT)")
    return targets


def unique_names(names: Sequence[str]) -> list[str]:
    """``["a", "b", "a"]`` -> ``["a #1", "b", "a #2"]``: every target gets its own label."""
    out, seen = [], {}
    for n in names:
        total = names.count(n)
        seen[n] = seen.get(n, 0) + 1
        out.append(f"{n} #{seen[n]}" if total > 1 else n)
    return out


# ---- the PyTorch reference, as a Runner ----

class TorchReferenceRunner(Runner):
    """The reference model behind the Runner interface, so it is benched exactly like an engine:
    numpy batch in host memory in, numpy logits out, under ``torch.inference_mode``.

    Args:
        model: the model in eval mode (on CPU; moved to ``device`` here).
        chw: input ``(C, H, W)``.
        device: ``"cpu"`` or a CUDA device. Defaults to ``"cpu"``.
        mode: ``"eager"``, ``"autocast-fp16"`` (CUDA only) or ``"compile"`` (``torch.compile``).
            Defaults to ``"eager"``.
    """

    def __init__(self, model: Any, chw: tuple[int, int, int], device: str = "cpu",
                 mode: str = "eager") -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.mode = mode
        self.model = model.to(self.device).eval()
        self._fn = torch.compile(self.model) if mode == "compile" else self.model
        self._chw = tuple(chw)
        self._cuda = self.device.type == "cuda"
        self._transfers = True
        self._resident: dict[int, Any] = {}
        self._last: dict[str, float] | None = None

    def input_metadata(self) -> InputMetadata:
        return InputMetadata(name="input", chw=self._chw)  # eager PyTorch takes any batch

    @property
    def capabilities(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"no_transfers", "stage_timings"}) if self._cuda else frozenset()

    def set_transfers(self, transfers: bool) -> None:
        if not self._cuda:
            super().set_transfers(transfers)
        self._transfers = transfers

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            if not self._cuda:
                return self._forward(torch.from_numpy(batch)).float().numpy()
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            ev[0].record()
            if self._transfers:
                x = torch.from_numpy(batch).to(self.device)
            else:  # inputs stay resident: one upload per distinct buffer
                x = self._resident.get(id(batch))
                if x is None:
                    x = self._resident[id(batch)] = torch.from_numpy(batch).to(self.device)
            ev[1].record()
            y = self._forward(x).float()
            ev[2].record()
            out = y.cpu() if self._transfers else y
            ev[3].record()
            ev[3].synchronize()
            self._last = {"h2d": ev[0].elapsed_time(ev[1]), "compute": ev[1].elapsed_time(ev[2]),
                          "d2h": ev[2].elapsed_time(ev[3])}
            if not self._transfers:
                del self._last["d2h"]
                return out  # device tensor: with --no-transfers nobody reads the logits
            return out.numpy()

    def _forward(self, x: Any) -> Any:
        if self.mode == "autocast-fp16":
            with self._torch.autocast(device_type=self.device.type, dtype=self._torch.float16):
                return self._fn(x)
        return self._fn(x)

    def timings(self) -> dict[str, float] | None:
        return self._last

    def close(self) -> None:
        self._resident.clear()


def reference_targets(checkpoint: Path | str, threads: int | None = None,
                      device: str | None = None) -> tuple[list[BenchTarget], list[str]]:
    """The PyTorch reference model as bench targets, with notes for the user.

    On CUDA: eager FP32, eager FP16 autocast and ``torch.compile`` FP32. On CPU: eager FP32 only.
    ``threads`` sets ``torch.set_num_threads`` (process-wide).
    """
    import torch


    ckpt = load_checkpoint(checkpoint)
    if threads is not None:
        torch.set_num_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    chw = ckpt.preprocess.input_shape
    name = Path(checkpoint).name
    common = {"backend_version": f"torch {torch.__version__}", "preprocess": ckpt.preprocess}
    notes = []
    if device == "cpu":
        modes = [("eager", "pytorch-eager", "fp32")]
        notes.append("reference on CPU: eager FP32 only (FP16 autocast and torch.compile are "
                     "benched when CUDA is available)")
    else:
        modes = [("eager", "pytorch-eager", "fp32"), ("autocast-fp16", "pytorch-eager", "fp16"),
                 ("compile", "pytorch-compile", "fp32")]
    targets = []
    for mode, backend, precision in modes:
        runner = TorchReferenceRunner(ckpt.grouped_model(), chw, device=device, mode=mode)
        targets.append(BenchTarget(name=f"{name} [torch {mode}]", runner=runner, backend=backend,
                                   precision=precision, **common))
    return targets, notes


# ---- inputs ----

def random_inputs(chw: Sequence[int], count: int, seed: int = 0) -> np.ndarray:
    """``count`` images of N(0, 1) float32 noise (preprocessed images are roughly that)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, *chw), dtype=np.float32)


def load_images(source: str | Path, spec: PreprocessSpec, count: int) -> np.ndarray:
    """Up to ``count`` preprocessed images ``(N, C, H, W)`` float32 from ``source`` (an image
    folder, an ``.npz`` or ``synthetic:SPLIT``) through :func:`alexnet_deploy.data.iter_batches`."""
    chunks, have = [], 0
    for batch in iter_batches(str(source), spec, batch_size=count, limit=count):
        images = np.asarray(batch.images, dtype=np.float32)
        chunks.append(images[: count - have])
        have += len(chunks[-1])
        if have >= count:
            break
    if not have:
        raise UserError(f"--data {source}: no images to bench with")
    return np.ascontiguousarray(np.concatenate(chunks))


class InputPool:
    """Distinct input batches per (input size, batch size), built on first use and kept.

    Args:
        data: ``None`` (the synthetic test split when the data layer provides it, else random),
            ``"random"``, a path / ``synthetic:SPLIT`` for :func:`load_images`, or an array of
            preprocessed images ``(N, C, H, W)``.
        seed: seed of the random data. Defaults to 0.
    """

    def __init__(self, data: Any = None, seed: int = 0) -> None:
        self.data = data
        self.seed = seed
        self._images: dict[Any, np.ndarray] = {}
        self._batches: dict[Any, list[np.ndarray]] = {}
        self.description = ""

    def images(self, chw: tuple[int, int, int], spec: PreprocessSpec | None) -> np.ndarray:
        key = (chw, spec)
        if key in self._images:
            return self._images[key]
        data, images = self.data, None
        if isinstance(data, np.ndarray):
            images = np.ascontiguousarray(data, dtype=np.float32)
            if images.ndim != 4 or tuple(images.shape[1:]) != tuple(chw):
                raise UserError(f"bench inputs have shape {images.shape}; this engine takes "
                                f"(N, {', '.join(map(str, chw))})")
            self.description = f"{len(images)} given preprocessed images"
        elif data is None or str(data) == "random":
            if data is None:
                images = self._default_images(chw, spec)
            if images is None:
                images = random_inputs(chw, POOL_IMAGES, self.seed)
                self.description = f"random N(0, 1) data, seed {self.seed}"
        else:
            spec = spec or PreprocessSpec.for_size(chw[-1])
            images = load_images(data, spec, POOL_IMAGES)
            self.description = f"{len(images)} preprocessed images from {data}"
        if not np.any(images):
            raise UserError("bench inputs are all zeros: pass real images (--data) or random data")
        self._images[key] = images
        return images

    def _default_images(self, chw, spec) -> np.ndarray | None:
        try:
            images = load_images(DEFAULT_DATA, spec or PreprocessSpec.for_size(chw[-1]),
                                 POOL_IMAGES)
        except UserError:
            return None
        self.description = f"{len(images)} preprocessed images from {DEFAULT_DATA}"
        return images

    def batches(self, chw: tuple[int, int, int], spec: PreprocessSpec | None,
                batch_size: int) -> list[np.ndarray]:
        """2 to 4 distinct contiguous batches, images taken round-robin from the pool."""
        key = (chw, spec, batch_size)
        if key not in self._batches:
            images = self.images(chw, spec)
            n = len(images)
            per = max(1, images[0].nbytes * batch_size)
            count = max(2, min(MAX_BUFFERS, BUFFER_BYTES // per))
            self._batches[key] = [
                np.ascontiguousarray(images[(k * (batch_size + 1) + np.arange(batch_size)) % n])
                for k in range(count)
            ]
        return self._batches[key]


# ---- the measurement ----

def check_budget(duration: float | None, iterations: int | None, warmup: float) -> None:
    """UserError for a zero or negative duration, iteration count or warm-up."""
    if duration is not None and not (duration > 0 and math.isfinite(duration)):
        raise UserError(f"--duration must be a positive number of seconds, got {duration}")
    if iterations is not None and iterations < 1:
        raise UserError(f"--iterations must be >= 1, got {iterations}")
    if not (warmup > 0 and math.isfinite(warmup)):
        raise UserError(f"--warmup must be a positive number of seconds, got {warmup}")


def check_batch_sizes(batch_sizes: Iterable[int]) -> list[int]:
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes:
        raise UserError("--batch-sizes: give at least one batch size, e.g. 1,8,32")
    if sizes[0] < 1:
        raise UserError(f"--batch-sizes: batch sizes must be >= 1, got {sizes[0]}")
    return sizes


def interleave_order(n_targets: int, rounds: int) -> list[list[int]]:
    """Target order per round: forward on even rounds, reversed on odd ones (A B C, C B A ...),
    so a steady drift within a round favours nobody."""
    forward = list(range(n_targets))
    return [forward if r % 2 == 0 else forward[::-1] for r in range(rounds)]


def bench_runners(named_runners: Any, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                  duration: float | None = DEFAULT_DURATION_S, iterations: int | None = None,
                  warmup: float = DEFAULT_WARMUP_S, data: Any = None, *,
                  transfers: bool = True, progress: bool = True,
                  warn: Callable[[str], None] | None = None, host: str | None = None,
                  seed: int = 0) -> list[BenchResult]:
    """Bench runners, interleaved, and return one :class:`BenchResult` per runner, in order.

    Args:
        named_runners: :class:`BenchTarget` objects, ``(name, runner)`` pairs or a
            ``{name: runner}`` mapping. Runners stay open: the caller closes them.
        batch_sizes: batch sizes to measure; each is checked against every runner's profile.
            Defaults to 1, 8, 32.
        duration: timed seconds per target and batch size. Defaults to 3.0. Ignored when
            ``iterations`` is given.
        iterations: timed calls per target and batch size, instead of ``duration``.
            Defaults to None.
        warmup: untimed seconds per target and batch size before timing (at least one call).
            Defaults to 1.0.
        data: inputs, see :class:`InputPool`. Defaults to None (synthetic test images when the
            data layer provides them, else N(0, 1) random data).
        transfers: False asks GPU runners to keep inputs on the device and skip the logits'
            copy back (``--no-transfers``). Defaults to True.
        progress: show a progress bar on stderr. Defaults to True.
        warn: where one-line warnings go. Defaults to stderr.
        host: the host description stored in results. Defaults to :func:`host_description`.
        seed: seed of random inputs. Defaults to 0.
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    targets = _as_targets(named_runners)
    sizes = check_batch_sizes(batch_sizes)
    if iterations is not None:
        duration = None
    elif duration is None:
        duration = DEFAULT_DURATION_S
    check_budget(duration, iterations, warmup)
    for t in targets:
        meta = t.runner.input_metadata()
        for b in sizes:
            try:
                meta.check_batch(b)
            except UserError as e:
                raise UserError(f"{t.name}: {e}") from None
    notes: list[list[str]] = [[] for _ in targets]
    for t, target_notes in zip(targets, notes):
        msg = _apply_transfers(t, transfers)
        if msg.startswith("warning: "):
            warn(msg[9:])
            msg = msg[9:]
        if msg:
            target_notes.append(msg)

    pool = InputPool(data, seed=seed)
    metas = [t.runner.input_metadata() for t in targets]
    n = len(targets)
    rounds = (max(1, math.ceil(duration / SLICE_S - 1e-9)) if iterations is None
              else min(iterations, ITERATION_ROUNDS))
    order = interleave_order(n, rounds)
    lat: dict[tuple[int, int], list[float]] = {}
    stages: dict[tuple[int, int], dict[str, list[float]]] = {}
    timed: dict[tuple[int, int], float] = {}

    bar = _Progress(progress, len(sizes) * n, duration, iterations, warmup)
    try:
        for b in sizes:
            buffers = [pool.batches(tuple(m.chw), t.preprocess, b) for t, m in zip(targets, metas)]
            buffers = [[(t.preprocess or PreprocessSpec()).denormalize(x) for x in bufs]
                       if t.input_format == "uint8-nhwc" else bufs
                       for t, bufs in zip(targets, buffers)]
            for i, t in enumerate(targets):
                bar.set_description(f"warm-up b={b} {_short(t.name)}")
                spent = _warm_up(t.runner, buffers[i], warmup)
                if iterations is None:
                    bar.update(min(spent, warmup))
            bar.set_description(f"timing b={b}" + (f" ({n} interleaved)" if n > 1 else ""))
            for i in range(n):
                lat[i, b], stages[i, b], timed[i, b] = [], {}, 0.0
            for r, round_order in enumerate(order):
                for i in round_order:
                    if iterations is None:
                        quota = (r + 1) * duration / rounds
                        calls = None
                    else:
                        quota = math.inf
                        calls = iterations // rounds + (1 if r < iterations % rounds else 0)
                        if calls == 0:
                            continue
                    spent, count = _timed_slice(targets[i].runner, buffers[i], lat[i, b],
                                                stages[i, b], timed[i, b], quota, calls)
                    timed[i, b] += spent
                    bar.update(spent if iterations is None else count)
    finally:
        bar.close()

    host = host if host is not None else host_description()
    method = describe_method(duration, iterations, warmup, n, rounds)
    out = []
    for i, t in enumerate(targets):
        res = BenchResult(name=t.name, backend=t.backend, precision=t.precision,
                          backend_version=t.backend_version, host=host,
                          inputs=pool.description, method=method, notes=notes[i])
        for b in sizes:
            res.results.append(BatchResult(
                batch_size=b, iterations=len(lat[i, b]), timed_s=timed[i, b],
                latency_ms=LatencyStats.from_ms(lat[i, b]),
                stages_ms={k: LatencyStats.from_ms(v) for k, v in stages[i, b].items() if v}))
        out.append(res)
    return out


def _apply_transfers(t: BenchTarget, transfers: bool) -> str:
    """Apply ``--no-transfers`` to one target; return the note saying what its numbers include
    (GPU runners), a ``"warning: "`` line when the flag does not apply, or ``""``."""
    caps = t.runner.capabilities
    if "no_transfers" in caps:
        t.runner.set_transfers(transfers)
        what = ("host-device transfers included (H2D + D2H inside each call)" if transfers else
                "transfers excluded (--no-transfers: inputs resident on the device, logits not "
                "copied back)")
        return f"{what}; no CUDA graphs (every call launches its work anew)"
    if not transfers:
        return (f"warning: --no-transfers does not apply to {t.name} ({t.backend} runs on the "
                "CPU: no host-device copies); ignored")
    return ""


def _warm_up(runner: Runner, buffers: list[np.ndarray], seconds: float) -> float:
    """Untimed calls for ``seconds`` (at least one per buffer); returns the time spent."""
    start = time.perf_counter()
    k = 0
    while True:
        runner.infer(buffers[k % len(buffers)])
        k += 1
        elapsed = time.perf_counter() - start
        if k >= len(buffers) and elapsed >= seconds:
            return elapsed


def _timed_slice(runner: Runner, buffers: list[np.ndarray], latencies: list[float],
                 stages: dict[str, list[float]], already: float, quota: float,
                 calls: int | None) -> tuple[float, int]:
    """Timed calls until ``calls`` are done, or (duration mode) until this target's timed time
    reaches ``quota``; at least one call in duration mode while under quota. Returns
    (wall seconds, calls)."""
    infer = runner.infer
    timings = runner.timings if "stage_timings" in runner.capabilities else None
    k0 = len(latencies)
    nbuf = len(buffers)
    start = time.perf_counter()
    count = 0
    while True:
        if calls is None:
            if already + (time.perf_counter() - start) >= quota:
                break
        elif count >= calls:
            break
        batch = buffers[(k0 + count) % nbuf]
        t0 = time.perf_counter()
        infer(batch)
        t1 = time.perf_counter()
        latencies.append((t1 - t0) * 1e3)
        if timings is not None:
            split = timings()
            for key, ms in (split or {}).items():
                stages.setdefault(key, []).append(float(ms))
        count += 1
    return time.perf_counter() - start, count


class _Progress:
    """A tqdm bar over the planned budget (seconds, or timed calls with ``--iterations``) that
    never runs past its total (the last call of a slice may overshoot the plan)."""

    def __init__(self, show: bool, jobs: int, duration: float | None, iterations: int | None,
                 warmup: float) -> None:
        self.bar = None
        if not show:
            return
        from tqdm import tqdm

        if iterations is None:
            self.total = round(jobs * (warmup + duration), 2)
            # disable=None: a bar only on a terminal, never in a redirected log
            self.bar = tqdm(total=self.total, unit="s", file=sys.stderr, leave=False, disable=None,
                            bar_format="{desc}{percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s "
                                       "[{elapsed}<{remaining}]")
        else:
            self.total = jobs * iterations
            self.bar = tqdm(total=self.total, unit="call", file=sys.stderr, leave=False,
                            disable=None)

    def update(self, n: float) -> None:
        if self.bar is not None:
            self.bar.update(max(0.0, min(n, self.total - self.bar.n)))

    def set_description(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def describe_method(duration: float | None, iterations: int | None, warmup: float,
                    targets: int, rounds: int) -> str:
    timing = (f"{duration:g} s timed" if iterations is None else f"{iterations} timed calls")
    text = f"per batch size and target: {warmup:g} s warm-up, then {timing}"
    if targets > 1:
        turns = (f"slices of about {SLICE_S:g} s" if iterations is None
                 else f"{rounds} rounds of calls")
        text += f"; {targets} targets interleaved in {turns}, order alternating each round"
    return text + "; latency = wall clock per infer() call, host memory in and out"


def host_description() -> str:
    """``hostname: CPU model, N CPUs, OS release`` (plus the GPU when torch sees one)."""

    text = (f"{platform.node()}: {cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} "
            f"{platform.release()}")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


# ---- the command ----

def engine_targets(paths: Sequence[str], threads: int | None) -> list[BenchTarget]:
    """Load each engine (UserError naming the path when it is missing or not an engine)."""
    names = unique_names([str(p) for p in paths])
    targets = []
    try:
        for path, name in zip(paths, names):
            targets.append(BenchTarget.from_engine(load_engine(path, threads=threads), name))
    except BaseException:
        close_targets(targets)
        raise
    return targets


def close_targets(targets: Iterable[BenchTarget]) -> None:
    for t in targets:
        with contextlib.suppress(Exception):  # closing must not hide the real outcome
            t.runner.close()


def run_bench(engines: Sequence[str], reference: str | None = None,
              batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
              duration: float | None = None, iterations: int | None = None,
              warmup: float = DEFAULT_WARMUP_S, threads: int | None = None,
              data: str | None = None, transfers: bool = True,
              json_path: str | None = None, report_path: str | None = None,
              echo: Callable[[str], None] = print,
              warn: Callable[[str], None] | None = None) -> list[BenchResult]:
    """What ``alexnet-deploy bench`` does: check every input first (so a bad path fails before
    minutes of measuring), load, bench, print the table, write JSON and report."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if duration is not None and iterations is not None:
        raise UserError("give --duration or --iterations, not both")
    if duration is None and iterations is None:
        duration = DEFAULT_DURATION_S
    check_budget(duration, iterations, warmup)
    sizes = check_batch_sizes(batch_sizes)
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    if not engines and not reference:
        raise UserError("nothing to bench: pass --engine ENGINE (and/or --reference CHECKPOINT)")
    inputs = {f"--engine {path}": path for path in engines}
    inputs.update({"--reference": reference, "--data": data})
    if json_path:
        check_output(json_path, "--json", "json", inputs=inputs)
    if report_path:

        check_output(report_path, "--report", "text", inputs=inputs)
        for plot in plot_paths(Path(report_path)):
            check_output(plot, "--report (its plots)", "png", inputs=inputs, say=None)

    targets = engine_targets(engines, threads)
    try:
        if reference:
            ref_targets, notes = reference_targets(reference, threads=threads)
            targets += ref_targets
            for note in notes:
                echo(note)
        results = bench_runners(targets, sizes, duration=duration, iterations=iterations,
                                warmup=warmup, data=data, transfers=transfers, warn=warn)
    finally:
        close_targets(targets)
    echo(format_table(results))
    if json_path:
        write_json(json_path, results)
        echo(f"wrote {json_path}")
    if report_path:

        written = write_report(report_path, results)
        echo("wrote " + ", ".join(str(p) for p in written))
    return results


def format_table(results: Sequence[BenchResult]) -> str:
    """A plain-text table for the terminal: one row per target and batch size."""
    base = results[0] if results else None
    head = ["engine", "backend", "precision", "batch", "img/s", "p50 ms", "p90 ms", "p99 ms"]
    multi = len(results) > 1
    if multi:
        head.append("x first")
    rows = []
    for res in results:
        for r in res.results:
            row = [res.name, res.backend, res.precision, str(r.batch_size),
                   f"{r.throughput:.1f}", f"{r.latency_ms.p50:.2f}", f"{r.latency_ms.p90:.2f}",
                   f"{r.latency_ms.p99:.2f}"]
            if multi:
                b = base.at(r.batch_size)
                row.append(f"{r.throughput / b.throughput:.2f}" if b else "-")
            rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in
                       enumerate(zip(row, widths))) for row in [head, *rows]]
    info = []
    if results:
        info = [f"host: {results[0].host}", f"inputs: {results[0].inputs}",
                f"method: {results[0].method}"]
    return "\n".join(lines + info)
