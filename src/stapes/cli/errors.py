"""Usage errors as one line that says what to do, like every other error of the CLI:

    Error: missing argument NAME: stapes exec NAME -- COMMAND...; see 'stapes exec --help'

instead of click's Usage/Try/Error block (exit status 2, as click's). `usage_message` is pure (unit-tested).
"""

from __future__ import annotations

import re
import sys
from typing import NoReturn

import click


def _argument_usage(param: click.Parameter) -> str:
    name = (param.human_readable_name or "").upper()
    if param.nargs == -1:
        name += "..."
    if isinstance(param.type, type(click.UNPROCESSED)) and param.nargs == -1:
        name = f"-- {name}"
    return name if param.required else f"[{name}]"


def synopsis(ctx: click.Context) -> str:
    """`stapes exec NAME -- COMMAND...`: the command and its arguments (options are in its --help)."""
    pieces = [_argument_usage(p) for p in ctx.command.get_params(ctx) if isinstance(p, click.Argument)]
    return " ".join([ctx.command_path, *pieces])


def _reason(err: click.UsageError) -> str:
    text = err.format_message().strip().rstrip(".")
    text = re.sub(r"^Missing argument '([^']+?)(\.\.\.)?'", lambda m: f"missing argument {m.group(1)}", text)
    text = re.sub(r"^No such option:? '?([^'\s]+?)'?(\.|$)", lambda m: f"no such option {m.group(1)}", text)
    text = re.sub(r"\s*Did you mean '?([^'?]+)'?\?", lambda m: f" (did you mean {m.group(1)}?)", text)
    text = re.sub(r"^Invalid value for '([^']+)'", lambda m: f"invalid value for {m.group(1)}", text)
    text = text.replace("\n", " ")
    return text[:1].lower() + text[1:] if text[:1].isupper() and not text[1:2].isupper() else text


def usage_message(err: click.UsageError) -> str:
    """The one line (without `Error: `): what is wrong, the command's synopsis, and where its help is."""
    ctx = err.ctx
    if ctx is None:
        return f"{_reason(err)}; see 'stapes --help'"
    if isinstance(ctx.command, click.Group):
        return f"{_reason(err)}; see '{ctx.command_path} --help'"
    return f"{_reason(err)}: {synopsis(ctx)}; see '{ctx.command_path} --help'"


def usage_error(err: click.UsageError) -> NoReturn:
    """Print the usage error as one line and exit 2. A group run without a command still shows its help
    (click's NoArgsIsHelpError is a usage error too)."""
    if type(err).__name__ == "NoArgsIsHelpError":
        raise err
    click.echo(f"Error: {usage_message(err)}", err=True)
    sys.exit(2)
