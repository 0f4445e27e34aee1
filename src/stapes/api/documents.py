"""Documents a client or a peer sends, parsed with bounds (pure): no YAML aliases (a 276-byte alias bomb
expands into millions of nodes), a bounded size, depth and node count, and records of bounded size."""

from __future__ import annotations

import json
from typing import Any

import yaml

from stapes.api.errors import BadRequest

MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (so every node is parsed from text once) and counts nodes and depth.
    Pure Python on purpose: libyaml's composer (CSafeLoader) cannot be hooked."""

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted here",
                                              event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES} nodes", None)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} deep", None)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(data: bytes | str, what: str, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """One YAML document from outside; BadRequest naming `what` for anything too large or not plain YAML.
    CPU-bound for large documents: call it in a thread."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > max_bytes:
        raise BadRequest(f"{what} is {size} bytes, more than the {max_bytes} accepted")
    loader = _BoundedLoader(data)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise BadRequest(f"{what} is not valid YAML or is too complex: {err}") from None
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    finally:
        loader.dispose()


def check_record_size(record: Any, what: str, max_bytes: int) -> None:
    """A parsed record that would be stored or served: at most `max_bytes` as JSON."""
    size = len(json.dumps(record, default=str))
    if size > max_bytes:
        raise BadRequest(f"{what} is {size} bytes as a record, more than the {max_bytes} accepted")
