"""The `stapes` command: one click group; each command group registers itself from its module."""

from __future__ import annotations

import logging
import os
import sys

import click
from click.shell_completion import get_completion_class

from stapes import __version__
from stapes.api.errors import StapesError
from stapes.cli import alias, argv, config, entities, image, instance, move, operation, remote, render, snapshot
from stapes.cli import backup as backup_cli
from stapes.cli import console as console_cli
from stapes.cli import files as files_cli
from stapes.cli.common import client_for, parse_remote_only
from stapes.client.config import ClientConfig

COMPLETE_VAR = "_STAPES_COMPLETE"


class StapesGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:  # one line, as every other error (issue 17): stapes.cli.errors
            from stapes.cli.errors import usage_error
            usage_error(err)
        except StapesError as err:
            render.error(err.message)
            sys.exit(1)
        except KeyboardInterrupt:
            render.error("interrupted")
            sys.exit(130)
        except OSError as err:  # a local file the command reads or writes: one line, never a traceback
            where = f" ({err.filename})" if err.filename else ""
            render.error(f"{err.strerror or err}{where}")
            sys.exit(1)


@click.group(cls=StapesGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stapes")
@click.option("--project", default=None, help="Project to use instead of the remote's")
@click.option("--debug", is_flag=True, help="Show every HTTP request and response (and server errors) on stderr")
@click.option("-v", "--verbose", is_flag=True, help="Show informational messages on stderr")
@click.option("-q", "--quiet", is_flag=True, help="No progress output; print only the essential result")
@click.option("--force-local", is_flag=True, help="Use the local unix socket, whatever remote is named")
def cli(project: str | None, debug: bool, verbose: bool, quiet: bool, force_local: bool) -> None:
    """Stapes: system containers and virtual machines, moved between servers.

    Names take the form [<remote>:]<name>; without a remote the default one is used ('stapes remote switch').
    The global options (--project, --debug, -v, -q, --force-local) may stand anywhere before '--'.
    """
    if debug or verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger = logging.getLogger("stapes")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG if debug else logging.INFO)


@cli.command(name="version")
@click.argument("remote_name", metavar="[REMOTE:]", required=False)
def version(remote_name: str | None) -> None:
    """Show the client's and the server's version.

    \b
    Examples:
      stapes version
      stapes version s1:
    """
    click.echo(f"Client version: {__version__}")
    try:
        with client_for(parse_remote_only(remote_name)) as client:
            env = client.server().get("environment") or {}
        server = str(env.get("server_version") or "unknown")
    except StapesError as err:
        render.debug(err.message)
        server = "unreachable"
    click.echo(f"Server version: {server}")


@cli.command(name="completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for bash, zsh or fish.

    \b
    Examples:
      stapes completion bash > /etc/bash_completion.d/stapes
      source <(stapes completion bash)
      stapes completion fish > ~/.config/fish/completions/stapes.fish
    """
    cls = get_completion_class(shell)
    if cls is None:  # click knows all three
        raise click.BadParameter(f"no completion for {shell}")
    click.echo(cls(cli, {}, "stapes", COMPLETE_VAR).source())


for module in (instance, move, snapshot, config, remote, entities, image, operation, alias, files_cli, backup_cli,
               console_cli):
    module.register(cli)


def prepare(args: list[str], aliases: dict[str, str]) -> list[str]:
    """The line click parses: aliases expanded, then the global options moved to the front."""
    expanded = argv.expand_alias(aliases, args)
    return argv.normalise(expanded if expanded is not None else args, cli)


def main() -> None:
    if os.environ.get(COMPLETE_VAR):  # click's completion protocol reads its own variables
        cli(prog_name="stapes")
        return
    try:
        aliases = ClientConfig.load().aliases
        args = prepare(sys.argv[1:], aliases)
    except StapesError as err:
        render.error(err.message)
        sys.exit(1)
    except (OSError, ValueError) as err:  # an unreadable config.yml: the commands say so again, if they need it
        render.debug(str(err))
        args = sys.argv[1:]
    if args and args[0].startswith("/") and sys.argv[1:] and args != sys.argv[1:]:
        os.execvp(args[0], args)  # an alias to a program ('/usr/bin/...'), as Incus runs it
    cli(args=args, prog_name="stapes")
