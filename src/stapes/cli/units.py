"""Figures in the units people read, as Incus shows them (pure: unit-tested): sizes in KiB/MiB/GiB, CPU time
in seconds, transfers as `9% 9.85MiB/110MiB 12.3MiB/s ETA 8s`, and no date at all for a zero time."""

from __future__ import annotations

from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
# Incus writes Go's zero time for "never" (no expiry, never used); older Stapes servers wrote the Unix epoch.
ZERO_TIMES = ("0001-01-01T00:00:00Z", "1970-01-01T00:00:00Z", "")


def _scaled(value: float) -> tuple[float, str]:
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return value, unit
        value /= 1024
    return value, _UNITS[-1]


def size(value: float) -> str:
    """Incus's GetByteSizeStringIEC with two decimals: `512B`, `9.85MiB`, `1.50GiB`."""
    scaled, unit = _scaled(float(value))
    return f"{int(scaled)}B" if unit == "B" else f"{scaled:.2f}{unit}"


def compact_size(value: float) -> str:
    """Three significant digits, no trailing zeros: `110MiB`, `12.3MiB`, `1.5GiB`."""
    scaled, unit = _scaled(float(value))
    digits = 0 if abs(scaled) >= 100 or unit == "B" else 1 if abs(scaled) >= 10 else 2
    text = f"{scaled:.{digits}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text}{unit}"


def seconds(nanoseconds: float) -> str:
    """CPU time as Incus shows it: whole seconds (`CPU usage (in seconds): 12`)."""
    return str(int(nanoseconds // 1_000_000_000))


def duration(secs: float) -> str:
    secs = int(secs)
    if secs < 60:
        return f"{secs}s"
    if secs < 3600:
        return f"{secs // 60}m{secs % 60:02d}s"
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m"


def transfer(figures: dict[str, Any]) -> str:
    """A progress line from an operation's `progress` figures (bytes, total, rate, percent, eta): `9%
    9.85MiB/110MiB 12.3MiB/s ETA 8s`; without a known total, just what moved and how fast. Empty when the
    figures are not a transfer's (the caller shows the server's own text then)."""
    if not isinstance(figures.get("bytes"), int | float):
        return ""
    done = size(figures["bytes"])
    total = figures.get("total")
    parts = []
    if isinstance(total, int | float) and total > 0:
        if "percent" in figures:
            parts.append(f"{figures['percent']}%")
        parts.append(f"{done}/{compact_size(total)}")
    else:
        parts.append(done)
    rate = figures.get("rate")
    if isinstance(rate, int | float):
        parts.append(f"{compact_size(rate)}/s")
    eta = figures.get("eta")
    if isinstance(eta, int | float) and eta > 0:
        parts.append(f"ETA {duration(eta)}")
    return " ".join(parts)


def when(timestamp: str | None, never: str = "never") -> str:
    """A timestamp from the API as shown; a zero time (no expiry, never used) as `never`."""
    return never if (timestamp or "") in ZERO_TIMES else str(timestamp)
