"""The policy of a VM's live move as pure functions (as OpenStack Nova's libvirt `migration.py`): the
monitor loop (qemu_live.py) reads `query-migrate` and calls these; every decision is unit-tested without QEMU.

Defaults come from QEMU 10 under TCG on a 2-core host, a 256 MiB guest (docs/performance.md): idle 0.60 s in
all, 3-5 ms downtime; dirtying ~128 MiB/s 1.2-1.7 s, 21-30 ms; auto-converge 22-118 s; post-copy 3.2 s, 1 ms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stapes.api.config_keys import parse_size
from stapes.api.errors import BadRequest

GiB = 2**30
MIN_TIMEOUT = 60.0  # seconds: a small guest still gets this long
UNLIMITED = 1 << 40  # bytes/s: QEMU takes no "none"
INITIAL_MAX_THROTTLE = 50  # auto-converge's cap until the action fires
MAX_THROTTLE = 99
ACTIONS = ("abort", "postcopy", "auto-converge")
FINAL = {"pre-switchover", "device", "postcopy-active", "completed"}

KEYS: dict[str, str] = {
    "migration.bandwidth": "QEMU's max-bandwidth, a size per second (default 1GiB; 0 or unlimited: none); QEMU's "
                           "own 128 MiB/s is slower than the link",
    "migration.downtime": "the largest allowed downtime in ms (default 500; measured here: 3-30 ms suffice)",
    "migration.downtime.steps": "how many times the allowed downtime is raised, from a fifth of it (default 5)",
    "migration.downtime.delay": "seconds per GiB of memory + disk between two raises (default 4)",
    "migration.timeout": "seconds per GiB of memory + disk before the timeout action (default 60, at least 60 s "
                         "in all; 0: none)",
    "migration.stall_timeout": "seconds without the remaining memory reaching a new low before the action "
                               "(default 20; 0: never)",
    "migration.timeout_action": "abort (default: the guest runs on, on the source), postcopy or auto-converge",
}


def _number(config: Mapping[str, str], key: str, default: float, low: float, high: float, what: str) -> float:
    text = config.get(key, "")
    if text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise BadRequest(f"{key}={text!r} is not {what}: set it to a number from {low:g} to {high:g}, or unset it "
                         "for the default")
    return value


@dataclass(frozen=True)
class LivePolicy:
    bandwidth: int = GiB  # bytes/s
    downtime_ms: int = 500
    downtime_steps: int = 5
    downtime_delay: float = 4.0  # s per GiB
    timeout: float = 60.0  # s per GiB; 0: none
    stall: float = 20.0  # s; 0: never
    action: str = "abort"

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> LivePolicy:
        """The instance's keys, each checked; BadRequest names the key, its value and what it takes."""
        text = config.get("migration.bandwidth", "").strip()
        if text in ("", ):
            bandwidth = GiB
        elif text in ("0", "unlimited"):
            bandwidth = UNLIMITED
        else:
            try:
                bandwidth = parse_size(text.removesuffix("/s"))
            except (BadRequest, ValueError):
                bandwidth = -1
            if bandwidth <= 0:
                raise BadRequest(f"migration.bandwidth={text!r} is not a size per second: set it as 1GiB, 500MB "
                                 "or a number of bytes (0 or unlimited for no cap)")
        action = config.get("migration.timeout_action", "") or "abort"
        if action not in ACTIONS:
            raise BadRequest(f"migration.timeout_action={action!r}: it takes {', '.join(ACTIONS)}")
        steps = _number(config, "migration.downtime.steps", 5, 1, 100, "a count of steps")
        if steps != int(steps):
            raise BadRequest(f"migration.downtime.steps={config['migration.downtime.steps']!r} is not a whole "
                             "number: set it from 1 to 100")
        return cls(bandwidth=bandwidth,
                   downtime_ms=int(_number(config, "migration.downtime", 500, 1, 60000, "a downtime in ms")),
                   downtime_steps=int(steps),
                   downtime_delay=_number(config, "migration.downtime.delay", 4, 0.001, 3600, "seconds per GiB"),
                   timeout=_number(config, "migration.timeout", 60, 0, 86400, "seconds per GiB"),
                   stall=_number(config, "migration.stall_timeout", 20, 0, 86400, "a number of seconds"),
                   action=action)


def check_config(config: Mapping[str, str]) -> None:
    LivePolicy.from_config(config)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _optional(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class Figures:
    """One `query-migrate` answer (QEMU's MigrationInfo), read with care: a missing or odd field is 0."""

    at: float  # seconds since the memory phase began
    status: str
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    dirty_rate: int = 0  # pages/s
    page_size: int = 4096
    mbps: float = 0.0
    iteration: int = 0  # dirty-sync-count
    expected_downtime_ms: int | None = None
    downtime_ms: int | None = None
    throttle_percent: int = 0
    error: str = ""

    @classmethod
    def from_query(cls, answer: Mapping[str, Any], at: float) -> Figures:
        ram = answer.get("ram")
        ram = ram if isinstance(ram, Mapping) else {}
        mbps = ram.get("mbps")
        return cls(at=at, status=str(answer.get("status", "")), transferred=_int(ram.get("transferred")),
                   remaining=_int(ram.get("remaining")), total=_int(ram.get("total")),
                   dirty_rate=_int(ram.get("dirty-pages-rate")), page_size=_int(ram.get("page-size")) or 4096,
                   mbps=float(mbps) if isinstance(mbps, int | float) and not isinstance(mbps, bool) else 0.0,
                   iteration=_int(ram.get("dirty-sync-count")),
                   expected_downtime_ms=_optional(answer.get("expected-downtime")),
                   downtime_ms=_optional(answer.get("downtime")),
                   throttle_percent=_int(answer.get("cpu-throttle-percentage")),
                   error=str(answer.get("error-desc") or ""))


def downtime_steps(policy: LivePolicy, data_bytes: int) -> list[tuple[float, int]]:
    """(seconds after the memory phase began, allowed downtime in ms): `steps + 1` entries, from
    downtime/steps at 0 s raised evenly to the downtime, one step every `delay` s per GiB of data (>= 1 s)."""
    base = max(1, policy.downtime_ms // policy.downtime_steps)
    offset = (policy.downtime_ms - base) / policy.downtime_steps
    delay = max(1.0, policy.downtime_delay * data_bytes / GiB)
    return [(delay * i, int(base + offset * i)) for i in range(policy.downtime_steps + 1)]


def downtime_at(steps: list[tuple[float, int]], elapsed: float) -> int:
    """The allowed downtime in force `elapsed` s into the memory phase."""
    return [downtime for at, downtime in steps if at <= elapsed][-1]


def completion_timeout(policy: LivePolicy, memory_bytes: int, disk_bytes: int) -> float | None:
    """Seconds the whole move may take: `timeout` per GiB of memory + disk, at least MIN_TIMEOUT; None: no
    limit (timeout 0)."""
    if not policy.timeout:
        return None
    return max(MIN_TIMEOUT, policy.timeout * (memory_bytes + disk_bytes) / GiB)


def stalled(history: Sequence[Figures], stall: float) -> bool:
    """The remaining memory has not reached a new low for `stall` s (QEMU past its first pass): the guest
    dirties memory as fast as it is sent. Never when `stall` is 0 or with fewer than two readings."""
    if not stall or len(history) < 2 or history[-1].iteration <= 1:
        return False
    lowest, lowest_at = history[0].remaining, history[0].at
    for figures in history[1:]:
        if figures.remaining < lowest:
            lowest, lowest_at = figures.remaining, figures.at
    return history[-1].at - lowest_at >= stall


@dataclass(frozen=True)
class Decision:
    downtime_ms: int | None = None  # a new downtime-limit to set now
    action: str | None = None  # "abort", "postcopy" (migrate-start-postcopy), "throttle" (max-cpu-throttle up)
    reason: str = ""


def decide(policy: LivePolicy, steps: list[tuple[float, int]], timeout: float | None, history: Sequence[Figures],
           current_downtime_ms: int, acted: bool) -> Decision:
    """From the latest reading (`history[-1]`):
    - once QEMU is switching over (or failed), nothing: it is too late to change anything (or QEMU says why);
    - the allowed downtime goes up to the step in force, never down;
    - when the timeout passed or the move stalled, the configured action fires once (abort, post-copy, or
      throttle harder); if it fired already and the timeout passed by half again, the move is aborted."""
    now = history[-1]
    if now.status in FINAL or now.status in ("failed", "cancelled", "cancelling"):
        return Decision()
    step = downtime_at(steps, now.at)
    raise_to = step if step > current_downtime_ms else None
    timed_out = timeout is not None and now.at >= timeout
    stuck = stalled(history, policy.stall)
    if acted:
        if timeout is not None and now.at >= timeout * 1.5:
            return Decision(raise_to, "abort", f"the migration did not complete within {timeout * 1.5:.0f}s, "
                            f"even after its {policy.action} action: allow more downtime (migration.downtime) or "
                            "time (migration.timeout), or stop the VM and move it")
        return Decision(raise_to)
    if not timed_out and not stuck:
        return Decision(raise_to)
    why = (f"the migration did not complete within {timeout:.0f}s (migration.timeout={policy.timeout:g} s per "
           "GiB of memory and disk)" if timed_out else
           f"the guest dirties its memory as fast as it is sent (no progress for {policy.stall:g}s, "
           "migration.stall_timeout)")
    if policy.action == "abort":
        return Decision(raise_to, "abort", f"{why}: allow more downtime (migration.downtime) or time "
                        "(migration.timeout), set migration.timeout_action=postcopy or auto-converge, or stop the "
                        "VM and move it")
    return Decision(raise_to, "postcopy" if policy.action == "postcopy" else "throttle", why)


def capabilities(policy: LivePolicy) -> list[dict[str, Any]]:
    """migrate-set-capabilities: events and the pause before the switchover always; auto-converge and
    post-copy only where the action needs them (both must be set before the migration starts)."""
    return [{"capability": "events", "state": True}, {"capability": "pause-before-switchover", "state": True},
            {"capability": "auto-converge", "state": policy.action == "auto-converge"},
            {"capability": "postcopy-ram", "state": policy.action == "postcopy"}]


def parameters(policy: LivePolicy, steps: list[tuple[float, int]]) -> dict[str, Any]:
    """migrate-set-parameters at the start: the bandwidth cap, the first allowed downtime, auto-converge's
    throttle (capped at INITIAL_MAX_THROTTLE until the action raises it)."""
    found: dict[str, Any] = {"max-bandwidth": policy.bandwidth, "downtime-limit": steps[0][1]}
    if policy.action == "auto-converge":
        found.update({"cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                      "max-cpu-throttle": INITIAL_MAX_THROTTLE})
    return found


def version_refusal(accel: str, qemu_version: str) -> str | None:
    """None when a live move is safe here; under TCG a QEMU older than 10 is refused (7.2 corrupted guests in
    most pre-copy migrations that needed more than a few passes on this kind of host; 10 did not in 21 runs)."""
    if accel != "tcg":
        return None
    match = re.match(r"\s*(\d+)\.", qemu_version)
    if match is not None and int(match.group(1)) >= 10:
        return None
    return (f"QEMU {qemu_version or '(unknown version)'} under TCG corrupts guests in live migrations: install "
            "QEMU 10 (on Debian 12 from bookworm-backports: scripts/setup-vm.sh does), or move the VM with "
            "--stateless")


def eta(figures: Figures) -> float | None:
    """Seconds left at the current rate (QEMU's mbps), when it is known."""
    if figures.mbps <= 0:
        return None
    return round(figures.remaining / (figures.mbps * 1e6 / 8), 1)
