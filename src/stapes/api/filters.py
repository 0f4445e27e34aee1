"""Incus's API filtering (`?filter=`), for the subset its clients send: `field eq|ne value`, joined with
`and`/`or` (and binds tighter), optional `not`. Fields are dotted paths into the rendered object."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from stapes.api.errors import BadRequest


def _lookup(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            # config keys contain dots themselves: try the remainder as one key
            if isinstance(obj, Mapping) and path.split(".", 1)[0] in ("config", "expanded_config"):
                break
            return None
        obj = obj[part]
    return obj


def _field(obj: Mapping[str, Any], name: str) -> Any:
    head, _, rest = name.partition(".")
    if head in ("config", "expanded_config") and rest:
        return (obj.get(head) or {}).get(rest)
    return _lookup(obj, name)


def parse(expression: str) -> list[list[tuple[bool, str, str, str]]]:
    """Disjunction of conjunctions of (negated, field, op, value)."""
    try:
        tokens = shlex.split(expression)
    except ValueError as err:
        raise BadRequest(f"Invalid filter {expression!r}: {err}") from None
    clauses: list[list[tuple[bool, str, str, str]]] = [[]]
    i = 0
    while i < len(tokens):
        negated = tokens[i].lower() == "not"
        if negated:
            i += 1
        if i + 3 > len(tokens):
            raise BadRequest(f"Invalid filter {expression!r}: expected 'FIELD eq|ne VALUE'")
        field, op, value = tokens[i:i + 3]
        if op.lower() not in ("eq", "ne"):
            raise BadRequest(f"Invalid filter {expression!r}: operator {op!r} is not eq or ne")
        clauses[-1].append((negated, field, op.lower(), value))
        i += 3
        if i < len(tokens):
            joiner = tokens[i].lower()
            if joiner == "or":
                clauses.append([])
            elif joiner != "and":
                raise BadRequest(f"Invalid filter {expression!r}: expected 'and' or 'or', got {tokens[i]!r}")
            i += 1
            if i == len(tokens):
                raise BadRequest(f"Invalid filter {expression!r}: it ends with {joiner!r}")
    return clauses


def matches(obj: Mapping[str, Any], expression: str) -> bool:
    if not expression.strip():
        return True
    for clause in parse(expression):
        ok = True
        for negated, field, op, value in clause:
            actual = _field(obj, field)
            equal = str(actual).lower() == value.lower() if actual is not None else False
            result = equal if op == "eq" else not equal
            if negated:
                result = not result
            if not result:
                ok = False
                break
        if ok:
            return True
    return False
