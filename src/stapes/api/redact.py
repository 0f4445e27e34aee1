"""Secrets out of text: messages, logs and errors never show an operation's websocket secrets or a token.

aiohttp's exceptions carry the URL they failed on, `?secret=` included, and a failure's text travels far
(the operation's `err`, the peer's error, the CLI, the daemon's log): everything that formats one goes
through `redact` (pure: unit-tested).
"""

from __future__ import annotations

import re

REDACTED = "<redacted>"
_QUERY = re.compile(r"(?i)(\b(?:secret|token|password)=)[^&\s'\"\]\)>,;]+")
_KEYED = re.compile(r"(?i)([\"']?\b(?:secret|secrets|token|control|fs|criu|state|0|1|2)[\"']?\s*[:=]\s*[\"'])"
                    r"[0-9a-f]{32,}([\"'])")


def redact(text: str) -> str:
    """`text` with every `secret=...` query value and every keyed websocket secret replaced."""
    return _KEYED.sub(rf"\1{REDACTED}\2", _QUERY.sub(rf"\1{REDACTED}", text))


def url_without_query(url: str) -> str:
    """An operation URL as it may be shown: no query string (where its secret travels)."""
    return url.split("?", 1)[0]
