"""Timestamps as Incus writes them: RFC 3339 in UTC."""

from __future__ import annotations

import datetime

NEVER = "0001-01-01T00:00:00Z"  # Incus's zero time (Go's): no expiry, never used


def iso(timestamp: float, zero: str = NEVER) -> str:
    """No time at all (never used, no expiry) is Incus's zero time, which its client shows as nothing."""
    if not timestamp:
        return zero
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat().replace("+00:00", "Z")
