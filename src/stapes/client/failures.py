"""How a failed migration is told (pure: unit-tested): the root cause first, in full; the other side's
failure, when it only followed from the first (a refused websocket, a lost connection, "the target failed:
<the same reason again>"), after it and short. Never a secret (stapes.api.redact)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from stapes.api.redact import redact

SHORT = 100  # characters of a consequential failure that are shown

# What a side says when it failed because the other one did (Stapes's own wording, and Incus's).
_CONSEQUENCE = re.compile(
    r"^(?:The (?:source|target|peer) (?:failed|went away|refused the|never connected|did not hand|stopped responding)"
    r"|The \w+ connection (?:was lost|failed|closed)"
    r"|Protocol error: the target answered without accepting"
    r"|Transfer to the target failed|Receiving from the source failed"
    r"|did not end after the other side failed"
    r"|The operation was cancelled|cancelled"
    r"|websocket: close|Failed (?:to )?(?:receive|send|read|write)"
    r"|Got error reading|Error from migration control source|Error from migration control target)",
    re.IGNORECASE)


@dataclass(frozen=True)
class SideFailure:
    side: str  # "source" or "target"
    server: str  # the user's remote name for it
    message: str


def is_consequence(message: str) -> bool:
    return bool(_CONSEQUENCE.match(message.strip()))


_OUTCOME = re.compile(r" \(([^()]*)\)$")  # what the side did about it: "(c1 runs on the source again)"


def _short(message: str) -> str:
    """The gist: what comes before the echoed reason ("The target failed: ..." -> "The target failed"), and
    the outcome the side ends its message with, which the user needs whole (where the instance runs now)."""
    message = message.strip()
    match = _CONSEQUENCE.match(message)
    if match is not None:
        rest = message[match.end():]
        head = message[:match.end()] + rest.split(": ", 1)[0]
    else:
        head = message
    head = head if len(head) <= SHORT else head[:SHORT].rsplit(" ", 1)[0] + "..."
    outcome = _OUTCOME.search(message)
    if outcome is not None and not head.endswith(outcome.group(0)):
        head += outcome.group(0)
    return head


def failure_message(failures: list[SideFailure]) -> str:
    """`Migration failed on the target (s2): <cause>; the source (s1) stopped too: <gist>`. With no side
    telling a cause (both followed from something else), the target's comes first, as it tends to say more."""
    ordered = sorted(failures, key=lambda f: (is_consequence(f.message), f.side != "target"))
    first, rest = ordered[0], ordered[1:]
    text = f"Migration failed on the {first.side} ({first.server}): {first.message}"
    for other in rest:
        if is_consequence(other.message):
            text += f"; the {other.side} ({other.server}) stopped too: {_short(other.message)}"
        else:
            text += f"; and on the {other.side} ({other.server}): {other.message}"
    return redact(text)
