"""The ``alexnet-deploy`` command line: one command per pipeline stage.

    alexnet-deploy train     -> train/RUN/{best,last}.pt
    alexnet-deploy export    -> MODEL.onnx
    alexnet-deploy calibrate -> calibration/NAME.json (+ .cache)
    alexnet-deploy build     -> engines/NAME/ (engine + engine.json sidecar)
    alexnet-deploy validate / bench / predict / demo

Commands are thin: they parse options and call the stage module, imported lazily so that
``--help`` is fast and nothing GPU-only is imported until a command needs it. A
:class:`~alexnet_deploy.errors.UserError` anywhere becomes one ``error: ...`` line and exit 2.
"""

from __future__ import annotations

import sys

import click

from alexnet_deploy import __version__
from alexnet_deploy.backends import BACKENDS
from alexnet_deploy.engine import BUILD_PRECISIONS
from alexnet_deploy.errors import UserError

# Option ranges, defined once: click refuses a value outside them before any work starts.
COUNT = click.IntRange(min=1)  # images, batch sizes, threads, epochs, calls
WORKERS = click.IntRange(min=0)  # decode processes; 0 decodes in the main process
NON_NEGATIVE_INT = click.IntRange(min=0)  # image counts where 0 means none (a holdout)
POSITIVE = click.FloatRange(min=0.0, min_open=True)  # seconds, learning rate, width
NON_NEGATIVE = click.FloatRange(min=0.0)  # tolerances, percentage points
FRACTION = click.FloatRange(0.0, 1.0)
PORT = click.IntRange(1, 65535)
MICROSECONDS = click.IntRange(min=0)  # a queue delay; 0: no waiting


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except click.UsageError as e:  # a bad option value: one line, not click's usage block
            where = e.ctx.command_path if e.ctx is not None else "alexnet-deploy"
            click.echo(f"error: {e.format_message()} (see '{where} --help')", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            _interrupted()
        except Exception as e:
            # Ctrl-C inside a native import (onnxruntime) surfaces as an ImportError caused by it
            if isinstance(e.__cause__ or e.__context__, KeyboardInterrupt):
                _interrupted()
            raise


def _interrupted() -> None:
    click.echo("interrupted: nothing half-written was left behind", err=True)
    sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="alexnet-deploy")
def cli() -> None:
    """Train AlexNet, export it to ONNX, calibrate, build engines, validate and benchmark them."""


def parse_csv(value: str, kind=str, name: str = "value") -> list:
    """``"1,8,32"`` -> ``[1, 8, 32]``; UserError naming the option on a bad item."""
    try:
        return [kind(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise UserError(f"{name}: cannot parse {value!r} as a comma-separated list ({e})") from e


# ---- train / evaluate (stage 1) ----

@cli.command()
@click.option("--data", metavar="PATH",
              help="Training images: an image folder (one sub-folder per class), an .npz or "
                   "synthetic:train.  [default: the recipe's 'data']")
@click.option("--val-data", metavar="PATH",
              help="Validation images, evaluated after every epoch; best.pt is the best epoch "
                   "on them.  [default: the recipe's, else the --holdout images]")
@click.option("--holdout", type=NON_NEGATIVE_INT, metavar="N",
              help="Keep N images of --data (a seeded draw) out of training; an INT8 accuracy "
                   "budget built on the same data measures on them, and without --val-data "
                   "they validate.  [default: the recipe's]")
@click.option("--recipe", metavar="NAME_OR_FILE",
              help="A shipped recipe (paper, cifar10, imagenette, demo) or a .toml file; "
                   "with --resume, the run's own.")
@click.option("--devices", metavar="A,B",
              help="Devices of tower 0 and tower 1: cpu,cpu  cuda:0,cuda:1  cuda:0,cuda:0.  "
                   "[default: the recipe's, else cpu,cpu]")
@click.option("--out", required=True, metavar="DIR",
              help="Run folder: metrics.jsonl, last.pt, best.pt.")
@click.option("--epochs", type=COUNT, metavar="N", help="Total epochs (overrides the recipe).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--lr", type=POSITIVE, metavar="LR", help="Learning rate (overrides the recipe).")
@click.option("--batch-size", type=COUNT, metavar="B", help="Images per step (per process).")
@click.option("--width-mult", type=POSITIVE, metavar="W", help="Scale every layer's width.")
@click.option("--image-size", type=COUNT, metavar="PX", help="Model input side (the crop).")
@click.option("--workers", type=WORKERS, metavar="N", help="Decode processes for image folders.")
@click.option("--seed", type=int, metavar="N", help="Seed of weights, data order, augmentation.")
@click.option("--amp/--no-amp", default=None, help="float16 autocast on CUDA.")
@click.option("--threads", type=COUNT, metavar="N",
              help="CPU threads (1 is fastest on a machine busy with other work).")
def train(data, val_data, holdout, recipe, devices, out, epochs, resume, lr, batch_size,
          width_mult, image_size, workers, seed, amp, threads) -> None:
    """Train AlexNet (two towers on --devices) and write DIR/{best,last}.pt."""
    from alexnet_deploy import train as training  # lazy: fast --help

    overrides = {"data": data, "val_data": val_data, "holdout": holdout, "devices": devices,
                 "epochs": epochs,
                 "lr": lr, "batch_size": batch_size, "width_mult": width_mult,
                 "image_size": image_size, "workers": workers, "seed": seed, "amp": amp}
    if resume:
        resolved = training.resume_recipe(out, overrides)
    elif recipe is None:
        raise UserError("--recipe is missing: name one of "
                        f"{', '.join(training.available_recipes())} or a .toml file")
    else:
        resolved = training.load_recipe(recipe).replace(**overrides)
    result = training.train(resolved, out, resume=resume, threads=threads)
    click.echo(f"trained {result.epochs} epochs; best top-1 {result.best_top1:.4f}; "
               f"checkpoints in {result.out}/")


@cli.command()
@click.option("--checkpoint", required=True, metavar="FILE", help="A .pt written by 'train'.")
@click.option("--data", required=True, metavar="PATH",
              help="Labelled images: an image folder, an .npz or synthetic:test.")
@click.option("--json", "json_path", metavar="FILE",
              help='Write {"top1", "top5", "num_images"} (fractions) as JSON.')
@click.option("--ten-crop", is_flag=True, help="Average the softmax over ten crops.")
@click.option("--batch-size", type=COUNT, default=128, show_default=True, metavar="B",
              help="Images per batch.")
@click.option("--devices", metavar="A,B",
              help="Run the two-tower model on these.  [default: the grouped form on CPU]")
@click.option("--workers", type=WORKERS, metavar="N", help="Decode processes for image folders.")
def evaluate(checkpoint, data, json_path, ten_crop, batch_size, devices, workers) -> None:
    """Top-1 / top-5 accuracy of a checkpoint, through its own preprocessing spec."""
    from alexnet_deploy.fileio import check_output, write_json_atomic  # lazy: fast --help
    from alexnet_deploy.train import evaluate as run_evaluate  # lazy: fast --help

    if json_path:  # before the evaluation, not after it
        check_output(json_path, "--json", "json", inputs={"--checkpoint": checkpoint,
                                                          "--data": data})
    result = run_evaluate(checkpoint, data, ten_crop=ten_crop, batch_size=batch_size,
                          devices=devices, workers=workers)
    skipped = f" ({result.skipped_images} unreadable skipped)" if result.skipped_images else ""
    click.echo(f"top1 {result.top1:.4f}  top5 {result.top5:.4f}  on {result.num_images} "
               f"images{skipped}")
    if json_path:
        write_json_atomic(json_path, result.to_json())


# ---- export (stage 2) ----

@cli.command()
@click.option("--checkpoint", metavar="FILE", help="A .pt written by 'alexnet-deploy train'.")
@click.option("--torchvision-weights", metavar="FILE.pth",
              help="Export a torchvision AlexNet state_dict instead of a checkpoint "
                   "(224 px, torchvision preprocessing).")
@click.option("--out", required=True, metavar="MODEL.onnx", help="The ONNX file to write.")
@click.option("--opset", type=int, default=17, show_default=True, metavar="N",
              help="ONNX opset (13 or newer: INT8 needs per-channel QuantizeLinear).")
@click.option("--parity-data", metavar="PATH",
              help="Real images for the parity check: an image folder, an .npz or "
                   "synthetic:test.  [default: synthetic:test]")
@click.option("--parity-images", type=COUNT, default=32, show_default=True, metavar="N",
              help="Images in the parity check.")
def export(checkpoint, torchvision_weights, out, opset, parity_data, parity_images) -> None:
    """Export the single-device model to ONNX, checked against PyTorch on real images."""
    from alexnet_deploy.export import run_export  # lazy: fast --help

    result = run_export(out, checkpoint=checkpoint, torchvision_weights=torchvision_weights,
                        opset=opset, parity_data=parity_data, parity_images=parity_images)
    click.echo(result.summary())


# ---- calibrate (stage 3) ----

@cli.command()
@click.option("--model", required=True, metavar="MODEL.onnx",
              help="The model written by 'alexnet-deploy export' (its preprocessing spec is "
                   "read from it).")
@click.option("--data", required=True, metavar="PATH",
              help="Calibration images: an image folder, an .npz or synthetic:train.")
@click.option("--method", default="entropy", show_default=True,
              type=click.Choice(["entropy", "percentile", "minmax", "mse"]),
              help="How each tensor's range is chosen from its histogram.")
@click.option("--percentile", type=float, default=None, metavar="P",
              help="--method percentile: the percentile of |x| kept.  [default: 99.99]")
@click.option("--num-images", type=COUNT, default=512, show_default=True, metavar="N",
              help="Images to use (a seeded random subset; all of them when there are fewer).")
@click.option("--batch-size", type=COUNT, default=32, show_default=True, metavar="B",
              help="Images per model run (the result does not depend on it).")
@click.option("--seed", type=int, default=0, show_default=True, metavar="S",
              help="Seed of the image subset.")
@click.option("--trt-version", default=None, metavar="X.Y.Z",
              help="TensorRT version written in the .cache header.  [default: the installed "
                   "TensorRT 10, else 10.16.1]")
@click.option("--out", required=True, metavar="calibration/NAME.json",
              help="Calibration file to write; the TensorRT cache goes beside it (NAME.cache).")
def calibrate(model, data, method, percentile, num_images, batch_size, seed, trt_version,
              out) -> None:
    """Choose per-tensor INT8 ranges from activation histograms on real images."""
    from alexnet_deploy.calibrate import calibrate as run_calibrate  # lazy: fast --help

    run_calibrate(model, data, out, method=method, percentile=percentile,
                  num_images=num_images, batch_size=batch_size, seed=seed,
                  trt_version=trt_version)


# ---- build (stage 4) ----

@cli.command()
@click.option("--model", required=True, metavar="MODEL.onnx",
              help="The model written by 'alexnet-deploy export'.")
@click.option("--precision", required=True, type=click.Choice(BUILD_PRECISIONS),
              help="Engine precision (INT8 needs --calibration).")
@click.option("--calibration", metavar="FILE",
              help="Calibration JSON from 'alexnet-deploy calibrate' on this model (INT8).")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", *BACKENDS]),
              help="Engine backend (auto: TensorRT on a GPU, else OpenVINO if installed, else "
                   "ONNX Runtime).")
@click.option("--max-batch", type=COUNT, default=64, show_default=True, metavar="N",
              help="Largest batch of a TensorRT engine's profile (CPU engines take any batch).")
@click.option("--min-batch", type=COUNT, default=1, show_default=True, metavar="N",
              help="Smallest batch of a TensorRT engine's profile.")
@click.option("--opt-batch", type=COUNT, default=None, metavar="N",
              help="The batch a TensorRT profile is tuned for (its kernels are chosen for it).  "
                   "[default: the power of two nearest sqrt(min x max): 8 for 1..64]")
@click.option("--timing-cache", metavar="FILE",
              help="TensorRT timing cache, read and updated (ignored with a warning when it is "
                   "from another TensorRT version or GPU).  "
                   "[default: ~/.cache/alexnet-deploy/tensorrt-timing.cache]")
@click.option("--no-timing-cache", is_flag=True, help="TensorRT: time every tactic afresh.")
@click.option("--int8-fallback", type=click.Choice(["fp32", "fp16"]), default=None,
              help="INT8: what the Q/DQ pairs leave unquantized runs in this precision "
                   "(TensorRT; LRN stays FP32).  [default: fp16 on TensorRT, fp32 elsewhere]")
@click.option("--min-agreement", type=FRACTION, default=None, metavar="F",
              help="INT8 accuracy budget: top-1 agreement with FP32 (0.99 = 99%) on held-out "
                   "images of --calibration-data. The build picks the calibration method and "
                   "the layers to keep out of INT8 so that it holds.")
@click.option("--max-top1-drop", type=NON_NEGATIVE, default=None, metavar="X",
              help="INT8 accuracy budget: top-1 percentage points the engine may lose (with "
                   "the model's own classes; else disagreement with FP32).")
@click.option("--calibration-data", metavar="PATH",
              help="Images (folder or .npz) an accuracy budget is calibrated and checked on; "
                   "when they are the model's training data, the budget is checked on the "
                   "images training held out (train --holdout).")
@click.option("--confidence", type=float, default=0.95, show_default=True, metavar="P",
              help="The budget must hold at this one-sided confidence (0.5: as measured).")
@click.option("--noise-view", type=NON_NEGATIVE, default=0.0, show_default=True,
              metavar="SIGMA",
              help="Also require the budget on the held-out images with Gaussian noise of this "
                   "deviation added (a stress test; 0: clean images only).")
@click.option("--best-effort", is_flag=True,
              help="Build the closest mix when the budget cannot be met (default: fail).")
@click.option("--placement", type=click.Choice(["cpu", "tensorrt"]), default=None,
              help="INT8 Q/DQ placement instead of the backend's own (e.g. TensorRT's, "
                   "simulated on ONNX Runtime).")
@click.option("--input", "input_format", type=click.Choice(["float32-nchw", "uint8-nhwc"]),
              default="float32-nchw", show_default=True,
              help="What the engine takes: preprocessed float32 NCHW images, or uint8 NHWC "
                   "pixels (resized and cropped; scaling, mean/std and layout in the graph).")
@click.option("--threads", type=COUNT, default=None, metavar="N", help="CPU threads.")
@click.option("--out", required=True, metavar="engines/NAME",
              help="Engine folder to write (an earlier engine there is replaced).")
def build(model, precision, calibration, backend, max_batch, min_batch, opt_batch, timing_cache,
          no_timing_cache, int8_fallback, min_agreement, max_top1_drop, calibration_data,
          confidence, noise_view, best_effort, placement, input_format, threads, out) -> None:
    """Build an engine folder (backend artifact + engine.json sidecar) from an ONNX model."""
    from alexnet_deploy.build import build_engine  # lazy: fast --help

    if no_timing_cache and timing_cache:
        raise UserError("--timing-cache and --no-timing-cache exclude each other: pass one")
    result = build_engine(model, precision, out, calibration=calibration, backend=backend,
                          max_batch=max_batch, max_top1_drop=max_top1_drop,
                          calibration_data=calibration_data, threads=threads,
                          min_batch=min_batch, opt_batch=opt_batch,
                          timing_cache=False if no_timing_cache else (timing_cache or True),
                          int8_fallback=int8_fallback,
                          min_agreement=min_agreement, confidence=confidence,
                          best_effort=best_effort, placement=placement,
                          input_format=input_format, noise_view=noise_view)
    for line in result.summary():
        click.echo(line)


# ---- validate (stage 5) ----

@cli.command()
@click.option("--engine", required=True, metavar="ENGINE",
              help="Engine folder from 'alexnet-deploy build'.")
@click.option("--reference", required=True, metavar="CHECKPOINT_OR_ONNX",
              help="The FP32 reference: the .pt checkpoint or the .onnx the engine came from.")
@click.option("--data", required=True, metavar="PATH",
              help="Labelled images: an image folder (one sub-folder per class) or an .npz.")
@click.option("--json", "json_path", metavar="FILE", help="Write the metrics as JSON.")
@click.option("--max-top1-drop", type=NON_NEGATIVE, default=0.5, show_default=True, metavar="X",
              help="Fail when engine top-1 is more than X percentage points below the reference.")
@click.option("--min-agreement", type=FRACTION, default=0.99, show_default=True, metavar="F",
              help="Fail when the top-1 agreement with the reference is below F (0..1).")
@click.option("--limit", type=COUNT, default=None, metavar="N",
              help="Validate on a seeded random subset of N images.")
@click.option("--batch-size", type=COUNT, default=None, metavar="B",
              help="Images per batch.  [default: 32, or the engine's largest batch]")
@click.option("--threads", type=COUNT, default=None, metavar="N", help="CPU threads.")
@click.option("--atol", type=NON_NEGATIVE, default=None, metavar="A",
              help="Logit tolerance, absolute: a logit fails when it is off by more than A and "
                   "by more than R x |reference| (Polygraphy's --atol/--rtol).  [default: "
                   "1e-3 for FP32, 5e-2 for FP16, none for INT8]")
@click.option("--rtol", type=NON_NEGATIVE, default=None, metavar="R",
              help="Logit tolerance, relative to |reference|.  [default: 1e-3 for FP32, 1e-2 "
                   "for FP16, none for INT8]")
@click.option("--allow-other-reference", is_flag=True,
              help="Compare with a reference that is not the model the engine was built from "
                   "(engine.json records its sha256).")
def validate(engine, reference, data, json_path, max_top1_drop, min_agreement, limit,
             batch_size, threads, atol, rtol, allow_other_reference) -> None:
    """Compare an engine with its FP32 reference on real images; exit 1 if a threshold fails."""
    from alexnet_deploy.validate import run_validate  # lazy: fast --help

    result = run_validate(engine, reference, data, json_path=json_path,
                          max_top1_drop=max_top1_drop, min_agreement=min_agreement, limit=limit,
                          batch_size=batch_size, threads=threads, atol=atol, rtol=rtol,
                          allow_other_reference=allow_other_reference)
    for line in result.summary():
        click.echo(line)
    if not result.passed:
        click.echo("validation failed: " + "; ".join(result.failures), err=True)
        sys.exit(1)


# ---- bench (stage 6) ----

@cli.command()
@click.option("--engine", "engines", multiple=True, metavar="ENGINE",
              help="Engine folder from 'alexnet-deploy build'. Repeat to compare engines: they "
                   "are interleaved and compared with the first.")
@click.option("--reference", metavar="CHECKPOINT",
              help="Also bench the PyTorch reference model (eager FP32; on CUDA also FP16 "
                   "autocast and torch.compile).")
@click.option("--batch-sizes", default="1,8,32", show_default=True, metavar="B1,B2,...",
              help="Batch sizes to measure.")
@click.option("--duration", type=POSITIVE, default=None, metavar="S",
              help="Timed seconds per engine and batch size.  [default: 3]")
@click.option("--iterations", type=COUNT, default=None, metavar="N",
              help="Timed calls per engine and batch size, instead of --duration.")
@click.option("--warmup", type=POSITIVE, default=1.0, show_default=True, metavar="S",
              help="Untimed warm-up seconds per engine and batch size.")
@click.option("--threads", type=COUNT, default=None, metavar="N",
              help="Threads for CPU backends (and the PyTorch reference on CPU).")
@click.option("--data", metavar="PATH",
              help="Images to bench with (folder, .npz, synthetic:SPLIT, or 'random').  "
                   "[default: synthetic:test, else random N(0,1) data]")
@click.option("--no-transfers", is_flag=True,
              help="GPU engines: time compute only, without host-device copies.")
@click.option("--json", "json_path", metavar="FILE", help="Write the results as JSON.")
@click.option("--report", "report_path", metavar="FILE.md",
              help="Write a markdown report with PNG plots beside it.")
def bench(engines, reference, batch_sizes, duration, iterations, warmup, threads, data,
          no_transfers, json_path, report_path) -> None:
    """Measure latency (min/p50/p90/p95/p99/max) and throughput of engines, trtexec-style."""
    from alexnet_deploy.bench import run_bench  # lazy: fast --help

    run_bench(list(engines), reference=reference,
              batch_sizes=parse_csv(batch_sizes, int, "--batch-sizes"), duration=duration,
              iterations=iterations, warmup=warmup, threads=threads, data=data,
              transfers=not no_transfers, json_path=json_path,
              report_path=report_path, echo=click.echo,
              warn=lambda msg: click.echo(f"warning: {msg}", err=True))


# ---- predict (use an engine) ----

@cli.command()
@click.option("--engine", required=True, metavar="ENGINE",
              help="Engine folder from 'alexnet-deploy build'.")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE_OR_FOLDER...")
@click.option("--top-k", type=COUNT, default=5, show_default=True, metavar="K",
              help="Classes printed per image.")
@click.option("--batch-size", type=COUNT, default=None, metavar="B",
              help="Images per engine call.  [default: 32 within the engine's batch range]")
@click.option("--json", "json_path", metavar="FILE",
              help="Also write every image's top-k (index, label, probability) as JSON.")
@click.option("--threads", type=COUNT, default=None, metavar="N",
              help="CPU threads.")
def predict(engine, images, top_k, batch_size, json_path, threads) -> None:
    """Print the top-k classes of images (files or folders) with their probabilities."""
    from alexnet_deploy.predict import run_predict, summary  # lazy: fast --help

    result = run_predict(engine, images, top_k=top_k, batch_size=batch_size, threads=threads,
                         json_path=json_path, echo=click.echo,
                         warn=lambda msg: click.echo(f"warning: {msg}", err=True))
    click.echo(summary(result), err=True)
    if result.skipped:
        sys.exit(1)


# ---- demo (the whole pipeline) ----

@cli.command()
@click.option("--data", default="synthetic:train", show_default=True, metavar="PATH",
              help="Training images: an image folder, an .npz or synthetic:train.")
@click.option("--val-data", metavar="PATH",
              help="Labelled validation images.  [default: synthetic:test, or --data itself]")
@click.option("--devices", metavar="A,B",
              help="Devices of the two towers.  [default: two GPUs if present, else cpu,cpu]")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", *BACKENDS]),
              help="Engine backend (auto: TensorRT on a GPU, else OpenVINO if installed, "
                   "else ONNX Runtime).")
@click.option("--epochs", type=COUNT, metavar="N", help="Override the demo recipe's epochs.")
@click.option("--report-dir", default="demo-report", show_default=True, type=click.Path(),
              help="Where report.md and its plots go.")
@click.option("--bench-seconds", default=2.0, show_default=True, type=POSITIVE,
              help="Timed seconds per engine and batch size.")
@click.option("--threads", type=COUNT, metavar="N", help="CPU threads.  [default: all cores]")
def demo(data, val_data, devices, backend, epochs, report_dir, bench_seconds, threads) -> None:
    """Train -> export -> calibrate -> build FP32/FP16/INT8 -> validate -> bench -> report."""
    from pathlib import Path

    # lazy, like every command here: --help stays fast
    from alexnet_deploy.demo import DemoConfig, run_demo, summary_lines

    cfg = DemoConfig(data=data, val_data=val_data, devices=devices, backend=backend,
                     epochs=epochs, report_dir=Path(report_dir), bench_seconds=bench_seconds,
                     threads=threads)
    result = run_demo(cfg, say=click.echo)
    for line in summary_lines(result):
        click.echo(line)
    if not result.passed:
        click.echo("error: an engine failed validation (see the table above)", err=True)
        sys.exit(1)


# ---- serving on Triton Inference Server (package / serve / loadtest) ----

_MAX_QUEUE_DELAY = click.option(
    "--max-queue-delay-us", type=MICROSECONDS, default=500, show_default=True, metavar="U",
    help="How long Triton's dynamic batcher waits for more requests to fill a batch.")
_INSTANCES = click.option("--instances", type=COUNT, default=1, show_default=True, metavar="N",
                          help="Model instances.")
_MAX_BATCH = click.option("--max-batch", type=COUNT, default=None, metavar="N",
                          help="Largest batch Triton forms.  [default: the engine's largest, "
                               "64 for CPU engines]")
_TOP_K = click.option("--top-k", type=COUNT, default=5, show_default=True, metavar="K",
                      help="Class names in each answer's 'labels'.")


@cli.command()
@click.option("--engine", required=True, metavar="ENGINE",
              help="Engine folder from 'alexnet-deploy build'.")
@click.option("--triton", "triton_dir", required=True, metavar="DIR",
              help="Triton model repository to write the model into (created if absent).")
@click.option("--name", default="alexnet", show_default=True, metavar="NAME",
              help="Model name (its folder in the repository).")
@click.option("--version", "model_version", default="1", show_default=True, metavar="V",
              help="Model version folder (a positive integer).")
@_INSTANCES
@_MAX_QUEUE_DELAY
@click.option("--bench", "bench_json", metavar="JSON",
              help="A 'bench --json' file of this engine: its fastest batch sizes become the "
                   "dynamic batcher's preferred ones.")
@click.option("--flavor", default="native", show_default=True,
              type=click.Choice(["native", "python"]),
              help="native: the engine file for Triton's ONNX Runtime / OpenVINO / TensorRT "
                   "backend; python: a model.py running the engine through alexnet-deploy.")
@_MAX_BATCH
@_TOP_K
def package(engine, triton_dir, name, model_version, instances, max_queue_delay_us, bench_json,
            flavor, max_batch, top_k) -> None:
    """Write a Triton model (config.pbtxt, model files, labels) for an engine."""
    from alexnet_deploy.serving.repository import package as write_package  # lazy: fast --help

    result = write_package(engine, triton_dir, name=name, version=model_version,
                           instances=instances, max_queue_delay_us=max_queue_delay_us,
                           bench=bench_json, flavor=flavor, max_batch=max_batch, top_k=top_k)
    for line in result.summary():
        click.echo(line)


@cli.command()
@click.option("--engine", required=True, metavar="ENGINE",
              help="Engine folder from 'alexnet-deploy build'.")
@click.option("--http-port", type=PORT, default=8000, show_default=True, metavar="PORT")
@click.option("--grpc-port", type=PORT, default=8001, show_default=True, metavar="PORT")
@click.option("--metrics-port", type=PORT, default=8002, show_default=True, metavar="PORT")
@click.option("--name", default="alexnet", show_default=True, metavar="NAME",
              help="Model name for tensors; NAME_image takes encoded images.")
@_MAX_BATCH
@_MAX_QUEUE_DELAY
@_INSTANCES
@_TOP_K
@click.option("--no-batching", is_flag=True,
              help="Serve the tensor model without the dynamic batcher (for comparisons).")
@click.option("--threads", type=COUNT, default=None, metavar="N", help="CPU threads of the engine.")
def serve(engine, http_port, grpc_port, metrics_port, name, max_batch, max_queue_delay_us,
          instances, top_k, no_batching, threads) -> None:
    """Serve an engine on Triton Inference Server (through PyTriton) until Ctrl-C."""
    from alexnet_deploy.serving.server import Ports  # lazy: fast --help
    from alexnet_deploy.serving.server import serve as run_serve  # lazy: fast --help

    run_serve(engine, ports=Ports(http_port, grpc_port, metrics_port), name=name,
              max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, instances=instances,
              top_k=top_k, threads=threads, batching=not no_batching, say=click.echo)


@cli.command()
@click.option("--engine", required=True, metavar="ENGINE",
              help="Engine folder to serve and to check every answer against.")
@click.option("--data", required=True, metavar="PATH",
              help="Images sent (an image folder or an .npz); each answer is checked against "
                   "the engine's own for that image.")
@click.option("--concurrency", default="1,2,4,8,16,32", show_default=True, metavar="C1,C2,...",
              help="Requests in flight at each level.")
@click.option("--protocols", default="http,grpc", show_default=True, metavar="P1,P2",
              help="http, grpc or both.")
@click.option("--batching", default="on,off", show_default=True, metavar="on,off",
              help="Dynamic batching settings to measure side by side.")
@click.option("--duration", type=POSITIVE, default=3.0, show_default=True, metavar="S",
              help="Timed seconds per level.")
@click.option("--rounds", type=COUNT, default=1, show_default=True, metavar="R",
              help="Repeat the sweep R times; req/s is the median over rounds.")
@click.option("--images", "num_images", type=COUNT, default=64, show_default=True, metavar="N",
              help="Distinct images sent (round robin).")
@_MAX_BATCH
@_MAX_QUEUE_DELAY
@click.option("--threads", type=COUNT, default=None, metavar="N", help="CPU threads of the engine.")
@click.option("--json", "json_path", metavar="FILE", help="Write the results as JSON.")
@click.option("--report", "report_path", metavar="FILE.md",
              help="Write a markdown report with a PNG plot beside it.")
def loadtest(engine, data, concurrency, protocols, batching, duration, rounds, num_images,
             max_batch, max_queue_delay_us, threads, json_path, report_path) -> None:
    """Concurrency sweep against 'serve' over HTTP and gRPC, every answer checked."""
    from alexnet_deploy.serving.loadtest import run_loadtest  # lazy: fast --help

    result = run_loadtest(engine, data, concurrency=parse_csv(concurrency, int, "--concurrency"),
                          protocols=parse_csv(protocols, str, "--protocols"),
                          batching=parse_csv(batching, str, "--batching"), duration=duration,
                          rounds=rounds, num_images=num_images, max_batch=max_batch,
                          max_queue_delay_us=max_queue_delay_us, threads=threads,
                          json_path=json_path, report_path=report_path, say=click.echo)
    if not result.passed:
        click.echo("error: some requests failed or were answered wrongly (see the table)",
                   err=True)
        sys.exit(1)


def main() -> None:
    cli(prog_name="alexnet-deploy")


if __name__ == "__main__":
    main()
