"""The `stapes` command: one click group; each command group registers itself from its module."""

from __future__ import annotations

import sys

import click

from stapes import __version__
from stapes.api.errors import StapesError
from stapes.cli import config, entities, image, instance, move, operation, remote, render, snapshot


class StapesGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except StapesError as err:
            render.error(err.message)
            sys.exit(1)
        except KeyboardInterrupt:
            render.error("interrupted")
            sys.exit(130)


@click.group(cls=StapesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stapes")
@click.option("--project", default=None, help="Project to use instead of the remote's")
def cli(project: str | None) -> None:
    """Stapes: system containers and virtual machines, moved between servers.

    Names take the form [<remote>:]<name>; without a remote the default one is used ('stapes remote switch').
    """


for module in (instance, move, snapshot, config, remote, entities, image, operation):
    module.register(cli)


def main() -> None:
    cli(prog_name="stapes")
