"""`stapes alias`: Incus's command line aliases, kept in the client's config.yml (expanded in argv.py)."""

from __future__ import annotations

import click

from stapes.api.errors import BadRequest, Conflict, NotFound
from stapes.cli import render
from stapes.cli.common import config


def register(cli: click.Group) -> None:
    @cli.group(name="alias")
    def alias_group() -> None:
        """Manage command line aliases."""

    @alias_group.command(name="add")
    @click.argument("name")
    @click.argument("target")
    def alias_add(name: str, target: str) -> None:
        """Add an alias: NAME (one or more words) runs TARGET, with @ARGS@ / @ARG1@ for the words given after.

        \b
        Examples:
          stapes alias add ls "list -c ns"
          stapes alias add login "exec @ARGS@ -- sh -l"
          stapes alias add logs "info @ARG1@ --show-log"
        """
        conf = config()
        if not name.strip():
            raise BadRequest("An alias needs a name")
        if name in conf.aliases:
            raise Conflict(f"Alias {name!r} already exists: remove it first, or rename it")
        conf.aliases[name] = target
        conf.save()

    @alias_group.command(name="list")
    @click.option("-f", "--format", "fmt", type=render.FormatType(), default="table",
                  help="table, csv, json, yaml or compact (csv,header / table,noheader)")
    def alias_list(fmt: str) -> None:
        """List aliases.

        \b
        Example:
          stapes alias list -f csv
        """
        aliases = config().aliases
        render.table(["ALIAS", "TARGET"], [[k, v] for k, v in sorted(aliases.items())], fmt, raw=dict(aliases))

    @alias_group.command(name="remove")
    @click.argument("name")
    def alias_remove(name: str) -> None:
        """Remove an alias.

        \b
        Example:
          stapes alias remove ls
        """
        conf = config()
        if name not in conf.aliases:
            raise NotFound(f"Alias {name!r} does not exist (see 'stapes alias list')")
        del conf.aliases[name]
        conf.save()

    @alias_group.command(name="rename")
    @click.argument("old")
    @click.argument("new")
    def alias_rename(old: str, new: str) -> None:
        """Rename an alias.

        \b
        Example:
          stapes alias rename ls l
        """
        conf = config()
        if old not in conf.aliases:
            raise NotFound(f"Alias {old!r} does not exist (see 'stapes alias list')")
        if new in conf.aliases:
            raise Conflict(f"Alias {new!r} already exists")
        conf.aliases[new] = conf.aliases.pop(old)
        conf.save()
