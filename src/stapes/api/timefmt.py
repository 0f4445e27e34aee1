"""Timestamps as Incus writes them: RFC 3339 in UTC."""

from __future__ import annotations

import datetime


def iso(timestamp: float) -> str:
    if not timestamp:
        return "1970-01-01T00:00:00Z"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat().replace("+00:00", "Z")
