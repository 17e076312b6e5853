"""The ``alexnet-deploy`` command line: one command per pipeline stage.

    alexnet-deploy train     -> train/RUN/{best,last}.pt
    alexnet-deploy export    -> MODEL.onnx
    alexnet-deploy calibrate -> calibration/NAME.json (+ .cache)
    alexnet-deploy build     -> engines/NAME/ (engine + engine.json sidecar)
    alexnet-deploy validate / bench / demo

Commands are thin: they parse options and call the stage module, imported lazily so that
``--help`` is fast and nothing GPU-only is imported until a command needs it. A
:class:`~alexnet_deploy.errors.UserError` anywhere becomes one ``error: ...`` line and exit 2.
"""

from __future__ import annotations

import sys

import click

from alexnet_deploy import __version__
from alexnet_deploy.errors import UserError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
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

# ---- export (stage 2) ----

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
@click.option("--num-images", type=int, default=512, show_default=True, metavar="N",
              help="Images to use (a seeded random subset; all of them when there are fewer).")
@click.option("--batch-size", type=int, default=32, show_default=True, metavar="B",
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
    from alexnet_deploy.calibrate import calibrate as run_calibrate

    run_calibrate(model, data, out, method=method, percentile=percentile,
                  num_images=num_images, batch_size=batch_size, seed=seed,
                  trt_version=trt_version)


# ---- build (stage 4) ----

@cli.command()
@click.option("--model", required=True, metavar="MODEL.onnx",
              help="The model written by 'alexnet-deploy export'.")
@click.option("--precision", required=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="Engine precision (INT8 needs --calibration).")
@click.option("--calibration", metavar="FILE",
              help="Calibration JSON from 'alexnet-deploy calibrate' on this model (INT8).")
@click.option("--backend", default="auto", show_default=True, metavar="NAME",
              help="auto, onnxruntime, openvino or tensorrt (auto: TensorRT on a GPU, else "
                   "OpenVINO if installed, else ONNX Runtime).")
@click.option("--max-batch", type=int, default=64, show_default=True, metavar="N",
              help="Largest batch of a TensorRT engine's profile (CPU engines take any batch).")
@click.option("--max-top1-drop", type=float, default=None, metavar="X",
              help="INT8: keep the layers that cost most accuracy in FP32 until the top-1 drop "
                   "measured on --calibration-data is at most X percentage points.")
@click.option("--calibration-data", metavar="PATH",
              help="Labelled images (folder or .npz) for --max-top1-drop.")
@click.option("--threads", type=int, default=None, metavar="N", help="CPU threads.")
@click.option("--out", required=True, metavar="engines/NAME",
              help="Engine folder to write (an earlier engine there is replaced).")
def build(model, precision, calibration, backend, max_batch, max_top1_drop, calibration_data,
          threads, out) -> None:
    """Build an engine folder (backend artifact + engine.json sidecar) from an ONNX model."""
    from alexnet_deploy.build import build_engine

    result = build_engine(model, precision, out, calibration=calibration, backend=backend,
                          max_batch=max_batch, max_top1_drop=max_top1_drop,
                          calibration_data=calibration_data, threads=threads)
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
@click.option("--max-top1-drop", type=float, default=0.5, show_default=True, metavar="X",
              help="Fail when engine top-1 is more than X percentage points below the reference.")
@click.option("--min-agreement", type=float, default=0.99, show_default=True, metavar="F",
              help="Fail when the top-1 agreement with the reference is below F (0..1).")
@click.option("--limit", type=int, default=None, metavar="N",
              help="Validate on a seeded random subset of N images.")
@click.option("--batch-size", type=int, default=None, metavar="B",
              help="Images per batch.  [default: 32, or the engine's largest batch]")
@click.option("--threads", type=int, default=None, metavar="N", help="CPU threads.")
def validate(engine, reference, data, json_path, max_top1_drop, min_agreement, limit,
             batch_size, threads) -> None:
    """Compare an engine with its FP32 reference on real images; exit 1 if a threshold fails."""
    from alexnet_deploy.validate import run_validate

    result = run_validate(engine, reference, data, json_path=json_path,
                          max_top1_drop=max_top1_drop, min_agreement=min_agreement, limit=limit,
                          batch_size=batch_size, threads=threads)
    for line in result.summary():
        click.echo(line)
    if not result.passed:
        click.echo("validation failed: " + "; ".join(result.failures), err=True)
        sys.exit(1)


# ---- bench (stage 6) ----

# ---- demo (the whole pipeline) ----


def main() -> None:
    cli(prog_name="alexnet-deploy")


if __name__ == "__main__":
    main()
