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

# ---- validate (stage 5) ----

# ---- bench (stage 6) ----

# ---- demo (the whole pipeline) ----


def main() -> None:
    cli(prog_name="alexnet-deploy")


if __name__ == "__main__":
    main()
