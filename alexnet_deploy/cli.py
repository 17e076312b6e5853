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

# ---- build (stage 4) ----

# ---- validate (stage 5) ----

# ---- bench (stage 6) ----

# ---- demo (the whole pipeline) ----


def main() -> None:
    cli(prog_name="alexnet-deploy")


if __name__ == "__main__":
    main()
