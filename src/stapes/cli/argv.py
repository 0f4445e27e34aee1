"""The command line before click sees it: aliases expanded, global options moved to the front (pure: unit-tested).

Incus's rules (cmd/incus/main_aliases.go): the options before the first word stay in front; an alias is one or
more words matching the first words of the line, the longest alias winning; its target is split as a shell
would; `@ARGS@` stands for the words after the alias, `@ARGn@` for the n-th of them (removed from `@ARGS@`);
without `@ARGS@` the remaining words are appended. A target starting with '/' is a program run instead.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

import click

from stapes.api.errors import BadRequest

# Incus's persistent flags: those taking a value, and plain flags.
GLOBAL_VALUE_OPTIONS = ("--project",)
GLOBAL_FLAGS = ("--debug", "--verbose", "-v", "--quiet", "-q", "--force-local")
DEFAULT_ALIASES = {"shell": "exec @ARGS@ -- su -l"}
_NUMBERED = re.compile(r"@ARG(\d+)@")


def _leading_options(argv: Sequence[str]) -> int:
    """How many tokens at the start are options (with the values of those that take one)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        i += 2 if argv[i] in GLOBAL_VALUE_OPTIONS else 1
    return min(i, len(argv))


def find_alias(aliases: Mapping[str, str], words: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """(alias words, target words) of the alias the line starts with: the one with the most words wins,
    then the first by name."""
    for key in sorted(sorted(aliases), key=lambda k: -len(k.split(" "))):
        key_words = key.split(" ")
        if list(words[:len(key_words)]) == key_words:
            try:
                target = shlex.split(aliases[key])
            except ValueError:
                target = aliases[key].split(" ")
            return key_words, target
    return None


def expand_alias(aliases: Mapping[str, str], argv: Sequence[str]) -> list[str] | None:
    """The line with its alias expanded (argv without the program name), or None when no alias applies."""
    start = _leading_options(argv)
    front, words = list(argv[:start]), list(argv[start:])
    if not words:
        return None
    found = find_alias(aliases, words) or find_alias(DEFAULT_ALIASES, words)
    if found is None:
        return None
    key, target = found
    if not target:
        raise BadRequest(f"Alias {' '.join(key)!r} expands to nothing")
    at_args = words[len(key):]
    numbered: dict[int, str] = {}
    for word in target:
        for match in _NUMBERED.finditer(word):
            number = int(match.group(1))
            if number < 1 or number > len(at_args):
                raise BadRequest(f"Alias {' '.join(key)!r} references an argument outside the given number "
                                 f"({match.group(0)} with {len(at_args)} given)")
            numbered[number] = at_args[number - 1]
    rest = [a for i, a in enumerate(at_args, start=1) if i not in numbered]
    result = list(front)
    used_args = False
    for word in target:
        if word == "@ARGS@":
            result += rest
            used_args = True
        else:
            result.append(_NUMBERED.sub(lambda m: numbered[int(m.group(1))], word))
    if not used_args:
        result += rest
    return result


def _own_options(command: click.Command) -> set[str]:
    return {opt for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}


def normalise(argv: Sequence[str], root: click.Group) -> list[str]:
    """Global options anywhere on the line (before `--`) go to the front, where click reads them, unless the
    command named so far has an option of that name itself (`launch -q` keeps its own)."""
    front: list[str] = []
    rest: list[str] = []
    command: click.Command = root
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        name, eq, _ = arg.partition("=")
        own = command is not root and name in _own_options(command)
        if name in GLOBAL_VALUE_OPTIONS and not own:
            if eq:
                front.append(arg)
                i += 1
            else:
                if i + 1 >= len(argv):
                    raise BadRequest(f"Option {name} needs a value")
                front += [arg, argv[i + 1]]
                i += 2
            continue
        if arg in GLOBAL_FLAGS and not own:
            front.append(arg)
            i += 1
            continue
        if not arg.startswith("-") and isinstance(command, click.Group) and arg in command.commands:
            command = command.commands[arg]
        rest.append(arg)
        i += 1
    return front + rest
