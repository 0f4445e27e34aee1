"""docs/cli.md and the commands agree: every command's --help has an example (a line starting `stapes `), and
every command appears in docs/cli.md (issue 17, item 7)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import click

from stapes.cli.main import cli

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found: list[tuple[tuple[str, ...], click.Command]] = []
    for name, command in sorted(group.commands.items()):
        if command.hidden:
            continue
        found.append(((*path, name), command))
        if isinstance(command, click.Group):
            found += _commands(command, (*path, name))
    return found


def _documented(text: str) -> set[tuple[str, ...]]:
    """Every command path the doc names: `stapes image alias create ...`, and the shorthand of its tables,
    `stapes profile list/show/create` (each of list, show and create), with every prefix."""
    named: set[tuple[str, ...]] = set()
    for match in re.finditer(r"\bstapes((?: [a-z][a-z-]*(?:/[a-z][a-z-]*)*)+)", text):
        words = [word.split("/") for word in match.group(1).split()]
        for combination in itertools.product(*words):
            for end in range(1, len(combination) + 1):
                named.add(tuple(combination[:end]))
    return named


def test_every_command_has_an_example() -> None:
    missing = [" ".join(path) for path, command in _commands(cli) if not isinstance(command, click.Group)
               and not any(line.strip().startswith("stapes ") for line in (command.help or "").splitlines())]
    assert not missing, f"{len(missing)} commands have no example line ('stapes ...') in --help: {missing}"


def test_every_command_is_in_the_cli_doc() -> None:
    named = _documented(DOC.read_text())
    missing = [" ".join(path) for path, _ in _commands(cli) if path not in named]
    assert not missing, f"{len(missing)} commands are not in docs/cli.md: {missing}"


def test_the_doc_reader_expands_the_tables_shorthand() -> None:
    named = _documented("| `stapes profile list/show/create NAME` | x |\n    stapes image alias create bb FP\n")
    assert {("profile", "show"), ("profile", "create"), ("image", "alias", "create"), ("image",)} <= named
    assert ("profile", "delete") not in named
