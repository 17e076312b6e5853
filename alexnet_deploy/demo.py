"""``alexnet-deploy demo``: the whole pipeline, measured, from one command.

    train (two towers) -> export -> calibrate -> build FP32/FP16/INT8 -> validate -> bench -> report

Each stage writes where a user running the stages by hand would get it::

    train/demo/            best.pt, last.pt, metrics.jsonl, model.onnx
    calibration/demo-entropy.json (+ .cache)
    engines/demo-fp32/ engines/demo-fp16/ engines/demo-int8/
    demo-report/report.md (+ report-throughput.png, report-latency.png)

Re-running resumes: a finished training run and an up-to-date export and calibration are reused,
an interrupted training run continues from ``last.pt``. Engines, validation and benchmarks are
redone (they take seconds) so the report always describes this machine now.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alexnet_deploy import train as training
from alexnet_deploy.backends import get_backend
from alexnet_deploy.bench import BenchTarget, bench_runners, reference_targets
from alexnet_deploy.build import build_engine
from alexnet_deploy.calibrate import calibrate
from alexnet_deploy.checkpoint import load_checkpoint
from alexnet_deploy.data import open_dataset
from alexnet_deploy.engine import BUILD_PRECISIONS, load_engine
from alexnet_deploy.errors import UserError
from alexnet_deploy.export import run_export
from alexnet_deploy.fileio import check_output
from alexnet_deploy.report import Section, plot_paths, write_report
from alexnet_deploy.validate import validate_engine


@dataclass
class DemoConfig:
    """What the demo runs on and where it writes.

    Args:
        data: training images. Defaults to the embedded ``synthetic:train``.
        val_data: labelled images for validation and calibration hold-out. Defaults to
            ``synthetic:test`` (with ``data`` given and this not: ``data`` itself).
        recipe: training recipe. Defaults to ``"demo"``.
        devices: the two towers' devices. Defaults to ``None`` (two GPUs if present, else
            ``cpu,cpu``).
        backend: engine backend. Defaults to ``"auto"`` (TensorRT on a GPU with TensorRT,
            else OpenVINO when installed, else ONNX Runtime).
        root: folder holding ``train/``, ``calibration/``, ``engines/``. Defaults to ``.``.
        report_dir: where the report goes. Defaults to ``demo-report``.
        epochs: override the recipe's epochs. Defaults to ``None``.
        calibration_images: images to calibrate on. Defaults to 512.
        batch_sizes: batch sizes to bench. Defaults to 1, 8, 32.
        bench_seconds: timed seconds per engine and batch size. Defaults to 2.0.
        threads: CPU threads for engines and the reference. Defaults to ``None`` (all cores).
    """

    data: str = "synthetic:train"
    val_data: str | None = None
    recipe: str = "demo"
    devices: str | None = None
    backend: str = "auto"
    root: Path = Path(".")
    report_dir: Path = Path("demo-report")
    epochs: int | None = None
    calibration_images: int = 512
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    bench_seconds: float = 2.0
    threads: int | None = None
    name: str = "demo"

    @property
    def validation_data(self) -> str:
        if self.val_data:
            return self.val_data
        return "synthetic:test" if self.data == "synthetic:train" else self.data


@dataclass
class DemoResult:
    run_dir: Path
    model: Path
    calibration: Path
    engines: dict[str, Path]
    validations: list[Any] = field(default_factory=list)
    bench: list[Any] = field(default_factory=list)
    report: Path | None = None

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.validations)


def default_devices() -> str:
    """Two GPUs -> ``cuda:0,cuda:1``; one -> ``cuda:0,cuda:0``; none -> ``cpu,cpu``."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {0: "cpu,cpu", 1: "cuda:0,cuda:0"}.get(n, "cuda:0,cuda:1")


def _train(cfg: DemoConfig, run_dir: Path, say: Callable[[str], None]) -> Path:

    recipe = training.load_recipe(cfg.recipe).replace(
        data=cfg.data, val_data=cfg.validation_data, devices=cfg.devices or default_devices(),
        epochs=cfg.epochs)
    last, best = run_dir / "last.pt", run_dir / "best.pt"
    if last.is_file():
        done = load_checkpoint(last).epoch
        if done >= recipe.epochs and best.is_file():
            say(f"  reusing the finished run in {run_dir}/ ({done} epochs; delete it to retrain)")
            return best
        say(f"  resuming the run in {run_dir}/ from epoch {done}")
        training.train(training.resume_recipe(run_dir, {"epochs": recipe.epochs}), run_dir,
                       resume=True)
    else:
        training.train(recipe, run_dir)
    return best


def _is_newer(path: Path, than: Path) -> bool:
    return path.is_file() and path.stat().st_mtime >= than.stat().st_mtime


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> DemoResult:
    """Run every stage; see the module docstring. Returns what was written and measured."""

    check_config(cfg)  # every option and output path, before any work
    root = Path(cfg.root)
    run_dir = root / "train" / cfg.name
    steps = 7

    say(f"[1/{steps}] train  {cfg.recipe} recipe on {cfg.data}, towers on "
        f"{cfg.devices or default_devices()}")
    checkpoint = _train(cfg, run_dir, say)

    model = run_dir / "model.onnx"
    say(f"[2/{steps}] export  {checkpoint} -> {model}")
    if _is_newer(model, checkpoint):
        say(f"  reusing {model} (newer than the checkpoint)")
    else:
        exported = run_export(model, checkpoint=checkpoint, parity_data=cfg.validation_data)
        say(f"  parity vs PyTorch: {exported.parity.summary()}" if getattr(exported, "parity", None)
            else "  written")

    calibration = root / "calibration" / f"{cfg.name}-entropy.json"
    say(f"[3/{steps}] calibrate  entropy, {cfg.calibration_images} images of {cfg.data} "
        f"-> {calibration}")
    calibrate(model, cfg.data, calibration, method="entropy",
              num_images=cfg.calibration_images, say=lambda m: say(f"  {m}"))

    engines: dict[str, Path] = {}
    say(f"[4/{steps}] build  {', '.join(BUILD_PRECISIONS)} with backend {cfg.backend}")
    for precision in BUILD_PRECISIONS:
        out = root / "engines" / f"{cfg.name}-{precision}"
        built = build_engine(model, precision, out, backend=cfg.backend,
                             calibration=calibration if precision == "int8" else None,
                             threads=cfg.threads, progress=False)
        engines[precision] = built.path
        say(f"  {out}: {built.sidecar.backend} {built.sidecar.backend_version}, "
            f"{built.size_bytes / 1e6:.1f} MB")

    say(f"[5/{steps}] validate  each engine vs the FP32 PyTorch reference on "
        f"{cfg.validation_data}")
    validations = []
    for precision, path in engines.items():
        result = validate_engine(path, checkpoint, cfg.validation_data, threads=cfg.threads)
        validations.append(result)
        verdict = "pass" if result.passed else "FAIL: " + "; ".join(result.failures)
        say(f"  {precision}: top-1 {result.engine_top1:.4f} (reference "
            f"{result.reference_top1:.4f}), agreement {result.top1_agreement:.4f} -> {verdict}")

    say(f"[6/{steps}] bench  {', '.join(engines)} + PyTorch reference, batch sizes "
        f"{', '.join(map(str, cfg.batch_sizes))}, {cfg.bench_seconds:g} s each, interleaved")
    targets = []
    try:
        for precision, path in engines.items():
            targets.append(BenchTarget.from_engine(load_engine(path, threads=cfg.threads),
                                                   f"{cfg.name}-{precision}"))
        refs, notes = reference_targets(checkpoint, threads=cfg.threads)
        for note in notes:
            say(f"  note: {note}")
        targets.extend(refs)
        bench = bench_runners(targets, cfg.batch_sizes, duration=cfg.bench_seconds,
                              warmup=min(1.0, cfg.bench_seconds), data=cfg.validation_data,
                              warn=lambda m: say(f"  warning: {m}"))
    finally:
        for t in targets:
            t.runner.close()

    say(f"[7/{steps}] report  {cfg.report_dir / 'report.md'}")
    result = DemoResult(run_dir=run_dir, model=model, calibration=calibration, engines=engines,
                        validations=validations, bench=bench)
    result.report = _write_report(cfg, result)
    return result


def _write_report(cfg: DemoConfig, result: DemoResult) -> Path:

    pipeline = Section(
        "Pipeline", text="\n".join([
            f"- training run: `{result.run_dir}/` (recipe `{cfg.recipe}`, data `{cfg.data}`)",
            f"- ONNX model: `{result.model}`",
            f"- calibration: `{result.calibration}` (entropy, {cfg.calibration_images} images)",
            *[f"- {p} engine: `{path}/`" for p, path in result.engines.items()],
        ]))
    validation = Section(
        f"Accuracy vs the FP32 PyTorch reference ({cfg.validation_data})",
        rows=[{"engine": Path(v.engine).name, "backend": v.backend, "precision": v.precision,
               "images": v.num_images, "top-1": f"{v.engine_top1:.4f}",
               "ref top-1": f"{v.reference_top1:.4f}", "top-1 drop (pt)": f"{v.top1_drop:+.2f}",
               "agreement": f"{v.top1_agreement:.4f}", "top-5 overlap": f"{v.top5_overlap:.4f}",
               "max |logit err|": f"{v.max_abs_logit_error:.2e}",
               "verdict": "pass" if v.passed else "FAIL"} for v in result.validations],
        text=f"Thresholds: top-1 drop at most {result.validations[0].max_top1_drop:g} point, "
             f"top-1 agreement at least {result.validations[0].min_agreement:g}.")
    paths = write_report(cfg.report_dir / "report.md", result.bench, [pipeline, validation],
                         title="alexnet-deploy demo",
                         intro="The whole pipeline on this machine, from `alexnet-deploy demo`.")
    return paths[0]


def summary_lines(result: DemoResult) -> list[str]:
    """The one-screen summary printed at the end."""
    best = {}
    for r in result.bench:
        top = max(r.results, key=lambda b: b.batch_size)
        best[r.name] = (top.batch_size, top.throughput)
    lines = ["", f"{'engine':<22}{'backend':<13}{'top-1':>8}{'agree':>8}{'img/s':>10}  verdict"]
    for v in result.validations:
        name = Path(v.engine).name
        b, tput = best.get(name, (0, float("nan")))
        lines.append(f"{name:<22}{v.backend:<13}{v.engine_top1:>8.4f}{v.top1_agreement:>8.4f}"
                     f"{tput:>10.1f}  {'pass' if v.passed else 'FAIL'}")
    for name, (b, tput) in best.items():
        if name not in {Path(v.engine).name for v in result.validations}:
            lines.append(f"{name:<22}{'pytorch':<13}{'':>8}{'':>8}{tput:>10.1f}  reference")
    lines.append(f"(img/s at batch {max(b for b, _ in best.values()) if best else '-'}; "
                 f"report: {result.report})")
    return lines


def check_config(cfg: DemoConfig) -> None:
    """Check every option before the first stage: a bad one fails in seconds, not at step 4.

    Raises:
        UserError: a bad number, recipe, device, backend, data set, or output folder.
    """

    if cfg.bench_seconds <= 0:
        raise UserError(f"--bench-seconds must be > 0, got {cfg.bench_seconds}")
    if cfg.calibration_images < 1:
        raise UserError(f"--calibration-images must be >= 1, got {cfg.calibration_images}")
    for name, value in (("--epochs", cfg.epochs), ("--threads", cfg.threads)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    training.load_recipe(cfg.recipe)
    if cfg.devices is not None:
        training.parse_devices(cfg.devices)  # checked even when a finished run would be reused
    get_backend(cfg.backend)  # installed and usable here (TensorRT: a GPU)
    for option, data in (("--data", cfg.data), ("--val-data", cfg.validation_data)):
        try:
            open_dataset(data)
        except UserError as e:
            raise UserError(f"{option}: {e}") from None
    root = Path(cfg.root)
    inputs = {"--data": cfg.data, "--val-data": cfg.val_data}
    check_output(root / "train" / cfg.name, "the demo's run folder", "run", inputs=inputs,
                 say=None)
    check_output(root / "calibration" / f"{cfg.name}-entropy.json", "the demo's calibration",
                 "calibration", inputs=inputs, say=None)
    for precision in BUILD_PRECISIONS:
        check_output(root / "engines" / f"{cfg.name}-{precision}", "the demo's engine",
                     "engine", inputs=inputs, say=None)
    report = cfg.report_dir / "report.md"
    for path, kind in ((report, "text"), *((plot, "png") for plot in plot_paths(report))):
        check_output(path, "--report-dir", kind, inputs=inputs, say=None)
