"""`stapes console`: attach to a container's console (detach with Ctrl+a q), or print its log."""

from __future__ import annotations

import os
import sys

import click

from stapes.cli.common import client_for, parse
from stapes.cli.terminal import raw_terminal


def register(cli: click.Group) -> None:
    @cli.command()
    @click.argument("name", metavar="[REMOTE:]NAME")
    @click.option("--show-log", is_flag=True, help="Print the console's log (its last 128 KiB) and exit")
    def console(name: str, show_log: bool) -> None:
        """Attach to an instance's console (what init and /dev/console show, a getty if one runs).

        Detach with Ctrl+a q (Ctrl+a Ctrl+a sends Ctrl+a itself); the instance goes on running.

        \b
        Examples:
          stapes console c1
          stapes console s1:c1 --show-log
        """
        remote, instance_name = parse(name)
        with client_for(remote) as client:
            if show_log:
                sys.stdout.buffer.write(client.console_log(instance_name))
                sys.stdout.buffer.flush()
                return
            terminal = sys.stdin.isatty()
            size = os.get_terminal_size() if sys.stdout.isatty() else os.terminal_size((80, 24))
            def attached() -> None:
                click.echo("To detach from the console, press: <ctrl>+a q\r", err=True)

            with raw_terminal(terminal):
                ended = client.console(instance_name, stdin=sys.stdin.buffer, stdout=sys.stdout.buffer,
                                       size=(size.columns, size.lines), attached=attached)
            if terminal:
                click.echo("", err=True)
            if ended:
                click.echo(f"The console of {instance_name!r} closed: the instance stopped, restarted or moved",
                           err=True)
