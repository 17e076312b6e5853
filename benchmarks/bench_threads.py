"""Throughput of one engine called from one thread vs from several threads at once.

Examples::

    python benchmarks/bench_threads.py --engine engines/full-int8-ov --engine engines/full-int8-ort
    python benchmarks/bench_threads.py --engine engines/demo-fp32 --batch 8 --threads 4 --json t.json

For each engine, two targets are benched interleaved by :func:`alexnet_deploy.bench.bench_runners`
(same slices, same inputs): the engine itself, one call at a time, and the same engine object
called from ``--threads`` threads at once, each thread with its own batch of ``--batch`` images
(one call of the second target is ``--threads`` concurrent ``infer`` calls). The ratio of their
img/s says what several callers (web-server threads, Triton instances) get from one loaded
engine; it should not fall below 1. For an ONNX Runtime engine a third target calls the same
session from ``--threads`` threads without the runner's queue (every call runs at once): the
measurement behind the runner's default of ``cores // threads`` concurrent runs.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from alexnet_deploy.backends import InputMetadata, Runner
from alexnet_deploy.backends.onnxruntime import OnnxRuntimeRunner
from alexnet_deploy.bench import BenchTarget, bench_runners, host_description
from alexnet_deploy.engine import load_engine


class ThreadedCalls(Runner):
    """``runner`` called from ``threads`` threads at once: a batch of ``threads x b`` images is
    split into ``threads`` batches of ``b``, inferred concurrently, and joined."""

    def __init__(self, runner: Runner, threads: int) -> None:
        self.runner, self.threads = runner, threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="caller")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        parts = np.split(batch, self.threads)
        return np.concatenate(list(self.pool.map(self.runner.infer, parts)))

    def input_metadata(self) -> InputMetadata:
        return self.runner.input_metadata()

    def close(self) -> None:
        self.pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--engine", action="append", required=True, help="engine folder")
    parser.add_argument("--batch", type=int, default=8, help="images per call per thread")
    parser.add_argument("--threads", type=int, default=4, help="concurrent calling threads")
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="CPU threads of each engine (default: the backend's)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per target")
    parser.add_argument("--data", default=None, help="images (default: synthetic or random)")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()

    rows = []
    for path in args.engine:
        with load_engine(path, threads=args.engine_threads) as engine:
            single = BenchTarget.from_engine(engine, "1 thread")
            threaded = BenchTarget.from_engine(engine, f"{args.threads} threads")
            threaded.runner = ThreadedCalls(engine.runner, args.threads)
            targets = [single, threaded]
            if isinstance(engine.runner, OnnxRuntimeRunner):
                unqueued = BenchTarget.from_engine(engine, f"{args.threads} threads, unqueued")
                unqueued.runner = ThreadedCalls(OnnxRuntimeRunner(
                    engine.runner.session, engine.runner.meta, max_concurrent=args.threads),
                    args.threads)
                targets.append(unqueued)
            try:
                results = bench_runners(targets, [args.batch, args.batch * args.threads],
                                        duration=args.seconds, warmup=1.0, data=args.data,
                                        progress=False)
            finally:
                for t in targets[1:]:
                    t.runner.close()
        one = results[0].at(args.batch).throughput
        many = [r.at(args.batch * args.threads).throughput for r in results[1:]]
        rows.append({"engine": path, "backend": engine.sidecar.backend,
                     "precision": engine.sidecar.precision, "batch_per_call": args.batch,
                     "threads": args.threads, "one_thread_img_s": round(one, 1),
                     "threads_img_s": round(many[0], 1), "ratio": round(many[0] / one, 3),
                     "unqueued_img_s": round(many[1], 1) if len(many) > 1 else None,
                     "unqueued_ratio": round(many[1] / one, 3) if len(many) > 1 else None})
    print(f"host: {host_description()}")
    print(f"{'engine':<34}{'backend':<12}{'prec':<6}{'1 thread':>10}"
          f"{f'{args.threads} threads':>12}{'ratio':>8}{'unqueued':>10}{'ratio':>8}"
          f"   (img/s, batch {args.batch} per call)")
    for r in rows:
        unq = ("" if r["unqueued_ratio"] is None
               else f"{r['unqueued_img_s']:>10.1f}{r['unqueued_ratio']:>8.2f}")
        print(f"{r['engine']:<34}{r['backend']:<12}{r['precision']:<6}"
              f"{r['one_thread_img_s']:>10.1f}{r['threads_img_s']:>12.1f}{r['ratio']:>8.2f}{unq}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host": host_description(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
