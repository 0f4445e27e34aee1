"""The policy of a VM's live move as small pure functions (as OpenStack Nova's `nova/virt/libvirt/migration.py`):
the monitor loop (qemu_live.py) polls QMP `query-migrate`, turns each answer into `Figures` and asks `decide`
what to do; nothing here talks to QEMU, so every rule is unit-tested without a hypervisor.

The defaults come from QEMU 10 under TCG on this 2-core host, a 256 MiB guest, source and target on one host
(docs/performance.md): idle 0.60 s in all with 3-5 ms downtime; a guest dirtying ~128 MiB/s 1.2-1.7 s with
21-30 ms; auto-converge 22-118 s; post-copy (switched at 3 s) 3.2 s with 1 ms.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stapes.api.config_keys import parse_size
from stapes.api.errors import BadRequest

GiB = 2**30
MiB = 2**20
UNLIMITED = 1 << 40  # bytes/s: what "0" or "unlimited" stands for (QEMU's max-bandwidth takes no "none")
MIN_TIMEOUT = 60.0  # s: the completion timeout of a small guest; the measured moves (<= 1.7 s) are 35x under it
THROTTLE_INITIAL = 20  # %: auto-converge's first CPU throttle (QEMU's own default)
THROTTLE_INCREMENT = 10  # %: added at each pass that does not converge (QEMU's own default)
INITIAL_MAX_THROTTLE = 50  # %: auto-converge's cap until the "throttle" action fires
MAX_THROTTLE = 99  # %: the cap the "throttle" action sets (QEMU's largest)
ESCALATION = 1.5  # an action that did not help: abort once the timeout passed by half again
ACTIONS = ("abort", "postcopy", "auto-converge")
PAGE_SIZE = 4096

# The memory phase: the only statuses in which an action may still fire. From pre-switchover on the guest is
# paused and QEMU is finishing (or post-copy runs the guest on the target: aborting would lose it), and
# failed/cancelled moves are over (the caller reads `error`).
PRECOPY = frozenset({"setup", "active", "wait-unplug"})
FINAL = frozenset({"pre-switchover", "device", "postcopy-active", "completed"})

# Defaults, each with the measurement it rests on (BRIEF §5, QEMU 10 on TCG, 256 MiB guest).
DEFAULT_BANDWIDTH = GiB  # bytes/s. The idle guest moved in 0.60 s, faster than QEMU's own 128 MiB/s cap allows
# (256 MiB alone take 2 s at that rate), and a guest dirtying ~128 MiB/s (moved in 1.2-1.7 s) would never
# converge under a cap equal to its dirty rate.
DEFAULT_DOWNTIME_MS = 500  # ms, the last step. Measured: 3-5 ms idle, 21-30 ms dirtying ~128 MiB/s, so the first
# step (100 ms) already covers both; the raise to 500 ms is for busier guests, as Nova's default.
DEFAULT_DOWNTIME_STEPS = 5  # raises from downtime/5 (100 ms) to the downtime, Nova's shape.
DEFAULT_DOWNTIME_DELAY = 4.0  # s per GiB of memory + disk between two raises: a 256 MiB guest gets a step a
# second (the floor), so the measured moves (0.60 s, 1.2-1.7 s) end in their first step or two.
DEFAULT_TIMEOUT = 60.0  # s per GiB of memory + disk, at least MIN_TIMEOUT: 60 s for the 256 MiB guest, 35x the
# 1.7 s a dirtying guest took; auto-converge's slow end (22-118 s) needs a larger value or post-copy.
DEFAULT_STALL = 20.0  # s without a new low of the remaining memory: a converging move here ended within 1.7 s.
DEFAULT_ACTION = "abort"  # the guest runs on, on the source (Nova's default). Post-copy was quick (3.2 s, 1 ms
# downtime) but a link lost after the switch loses the guest; auto-converge slows it (22-118 s).

KEYS: dict[str, str] = {
    "migration.bandwidth": "QEMU's max-bandwidth and the disk mirror's speed, a size per second (1GiB, 500MB, "
                           "bytes; default 1GiB; 0 or unlimited: no cap); QEMU's own 128 MiB/s is slower than "
                           "the link",
    "migration.downtime": "the largest downtime allowed at the switchover, in ms from 1 to 60000 (default 500; "
                          "reached in steps)",
    "migration.downtime.steps": "how many times the allowed downtime is raised, from downtime/steps up to "
                                "migration.downtime (1 to 100, default 5)",
    "migration.downtime.delay": "seconds per GiB of memory + disk between two raises of the allowed downtime "
                                "(more than 0, default 4; at least 1 s a step)",
    "migration.timeout": "seconds per GiB of memory + disk the move may take before migration.timeout_action "
                         f"fires (default 60, at least {MIN_TIMEOUT:.0f} s in all; 0: no limit)",
    "migration.stall_timeout": "seconds without the remaining memory reaching a new low before "
                               "migration.timeout_action fires (default 20; 0: never)",
    "migration.timeout_action": "what a timeout or a stall does: abort (default: the guest runs on, on the "
                                "source), postcopy (the guest runs on the target at once, its memory follows) "
                                "or auto-converge (QEMU throttles the guest's CPUs harder)",
}


def _invalid(key: str, text: str, takes: str, default: str) -> BadRequest:
    return BadRequest(f"Invalid value for {key} {text!r}: it takes {takes} (unset it for the default, {default})")


def _whole(config: Mapping[str, str], key: str, default: int, low: int, high: int, unit: str) -> int:
    text = config.get(key, "")
    if text.strip() == "":
        return default
    if not re.fullmatch(r"\s*[0-9]+\s*", text) or not low <= int(text) <= high:
        raise _invalid(key, text, f"a whole number of {unit} from {low} to {high}", str(default))
    return int(text)


def _seconds(config: Mapping[str, str], key: str, default: float, high: float, zero: str) -> float:
    """A number of seconds from 0 (only where `zero` says what 0 means) to `high`."""
    text = config.get(key, "")
    if text.strip() == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= high or (zero and value == 0)):
        takes = f"0 ({zero}) or a number of seconds up to {high:g}" if zero else \
            f"a number of seconds above 0, up to {high:g}"
        raise _invalid(key, text, takes, f"{default:g}")
    return value


def _bandwidth(config: Mapping[str, str]) -> int:
    key = "migration.bandwidth"
    text = config.get(key, "")
    if text.strip() == "":
        return DEFAULT_BANDWIDTH
    if text.strip().lower() == "unlimited":
        return UNLIMITED
    try:
        value = parse_size(text.strip().removesuffix("/s"))
    except ValueError:
        raise _invalid(key, text, "a size per second such as 1GiB, 500MB or a number of bytes (0 or unlimited: "
                       "no cap)", "1GiB") from None
    return UNLIMITED if value == 0 else min(value, UNLIMITED)


@dataclass(frozen=True)
class LivePolicy:
    """An instance's live-move policy, from its `migration.*` keys (see KEYS)."""

    bandwidth: int = DEFAULT_BANDWIDTH  # bytes/s, QEMU's max-bandwidth
    downtime_ms: int = DEFAULT_DOWNTIME_MS  # the final (largest) allowed downtime
    downtime_steps: int = DEFAULT_DOWNTIME_STEPS
    downtime_delay: float = DEFAULT_DOWNTIME_DELAY  # s per GiB of memory + disk between two steps
    timeout: float = DEFAULT_TIMEOUT  # s per GiB of memory + disk; 0: none
    stall: float = DEFAULT_STALL  # s; 0: never
    action: str = DEFAULT_ACTION

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> LivePolicy:
        """Reads the keys, an unset or empty key meaning its default; BadRequest names the key, its value and
        what it takes."""
        action = config.get("migration.timeout_action", "").strip() or DEFAULT_ACTION
        if action not in ACTIONS:
            raise _invalid("migration.timeout_action", config["migration.timeout_action"],
                           "abort, postcopy or auto-converge", DEFAULT_ACTION)
        return cls(bandwidth=_bandwidth(config),
                   downtime_ms=_whole(config, "migration.downtime", DEFAULT_DOWNTIME_MS, 1, 60000, "milliseconds"),
                   downtime_steps=_whole(config, "migration.downtime.steps", DEFAULT_DOWNTIME_STEPS, 1, 100,
                                         "steps"),
                   downtime_delay=_seconds(config, "migration.downtime.delay", DEFAULT_DOWNTIME_DELAY, 3600, ""),
                   timeout=_seconds(config, "migration.timeout", DEFAULT_TIMEOUT, 86400, "no limit"),
                   stall=_seconds(config, "migration.stall_timeout", DEFAULT_STALL, 86400, "never"),
                   action=action)


def check_config(config: Mapping[str, str]) -> None:
    """Refuses a bad `migration.*` value when a VM's configuration is set, as `LivePolicy.from_config` would."""
    LivePolicy.from_config(config)


def _count(value: Any) -> int:
    """A non-negative integer from QEMU's JSON, else 0 (a bool is no number)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _optional(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _rate(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    return 0.0


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class Figures:
    """One `query-migrate` answer (QEMU 10's MigrationInfo), read with care: a missing or mistyped field is
    0, None or ""."""

    at: float  # seconds since the memory phase began
    status: str  # "setup", "active", "pre-switchover", "device", "postcopy-active", "completed", "failed", ...
    transferred: int = 0  # ram.transferred, bytes
    remaining: int = 0  # ram.remaining, bytes
    total: int = 0  # ram.total, bytes
    dirty_rate: int = 0  # ram.dirty-pages-rate, pages/s
    page_size: int = PAGE_SIZE  # ram.page-size
    mbps: float = 0.0  # ram.mbps, megabits/s
    iteration: int = 0  # ram.dirty-sync-count: 1 during the first pass
    expected_downtime_ms: int | None = None  # expected-downtime
    downtime_ms: int | None = None  # downtime, once completed
    throttle_percent: int = 0  # cpu-throttle-percentage
    error: str = ""  # error-desc

    @classmethod
    def from_query(cls, answer: Mapping[str, Any], at: float) -> Figures:
        """`answer` is query-migrate's return value; `at` the caller's clock, in seconds since the memory phase
        began."""
        if not isinstance(answer, Mapping):
            answer = {}
        ram = answer.get("ram")
        if not isinstance(ram, Mapping):
            ram = {}
        return cls(at=at, status=_text(answer.get("status")), transferred=_count(ram.get("transferred")),
                   remaining=_count(ram.get("remaining")), total=_count(ram.get("total")),
                   dirty_rate=_count(ram.get("dirty-pages-rate")),
                   page_size=_count(ram.get("page-size")) or PAGE_SIZE, mbps=_rate(ram.get("mbps")),
                   iteration=_count(ram.get("dirty-sync-count")),
                   expected_downtime_ms=_optional(answer.get("expected-downtime")),
                   downtime_ms=_optional(answer.get("downtime")),
                   throttle_percent=_count(answer.get("cpu-throttle-percentage")),
                   error=_text(answer.get("error-desc")))


def downtime_steps(policy: LivePolicy, data_bytes: int) -> list[tuple[float, int]]:
    """Nova's generator: (seconds after the memory phase began, allowed downtime in ms), `steps + 1` entries.
    The first is at 0 s with base = downtime/steps (at least 1 ms); the downtime is then raised evenly, the
    last entry being exactly `downtime_ms`; two entries are `downtime_delay` s per GiB of data (memory + disk)
    apart, at least 1 s."""
    count = max(1, policy.downtime_steps)
    base = max(1, policy.downtime_ms // count)
    delay = max(1.0, policy.downtime_delay * max(0, data_bytes) / GiB)
    return [(delay * i, base + (policy.downtime_ms - base) * i // count) for i in range(count + 1)]


def downtime_at(steps: list[tuple[float, int]], elapsed: float) -> int:
    """The allowed downtime of the last step that began at or before `elapsed` s into the memory phase (the
    first step before it)."""
    if not steps:
        raise ValueError("no downtime steps: build them with downtime_steps()")
    allowed = steps[0][1]
    for at, downtime in steps:
        if at > elapsed:
            break
        allowed = downtime
    return allowed


def completion_timeout(policy: LivePolicy, memory_bytes: int, disk_bytes: int,
                       floor: float = MIN_TIMEOUT) -> float | None:
    """Seconds the whole move may take: `timeout` per GiB of memory + disk, at least `floor` (MIN_TIMEOUT but
    in tests that make it fire); None when `migration.timeout` is 0 (no limit)."""
    if policy.timeout <= 0:
        return None
    return max(floor, policy.timeout * (max(0, memory_bytes) + max(0, disk_bytes)) / GiB)


def stalled(history: Sequence[Figures], stall: float) -> bool:
    """The move makes no progress (Nova's and Proxmox's "progress timeout"): over the readings of the memory
    phase (status active) after QEMU's first pass, `remaining` has reached no new low for `stall` s. The
    first pass (dirty-sync-count <= 1) copies all memory once, so its shrinking `remaining` is no measure of
    convergence: its readings set no low, and while it runs nothing is stalled. False as well when `stall` is
    0 (disabled), with fewer than two readings, or when the latest reading is not in the memory phase."""
    if stall <= 0 or len(history) < 2 or history[-1].status != "active" or history[-1].iteration <= 1:
        return False
    passes = [f for f in history if f.status == "active" and f.iteration > 1]
    lowest, lowest_at = passes[0].remaining, passes[0].at
    for figures in passes[1:]:
        if figures.remaining < lowest:
            lowest, lowest_at = figures.remaining, figures.at
    return history[-1].at - lowest_at >= stall


@dataclass(frozen=True)
class Decision:
    """What the monitor loop does now."""

    downtime_ms: int | None = None  # a new downtime-limit to set now (None: unchanged)
    action: str | None = None  # None, "abort", "postcopy" (migrate-start-postcopy), "throttle" (max-cpu-throttle
    # to MAX_THROTTLE)
    reason: str = ""  # with an action: a sentence for the user (the log, or the error of an abort)


_REMEDY = "set a larger migration.timeout, allow more downtime (migration.downtime), or set " \
          "migration.timeout_action=postcopy or auto-converge"
_DOING = {"postcopy": "switching to post-copy (the guest runs on the target, its memory follows)",
          "auto-converge": f"throttling the guest's CPUs harder (up to {MAX_THROTTLE}%)"}


def _late(policy: LivePolicy, timeout: float) -> str:
    return (f"the migration did not complete within {timeout:.0f} s of its memory phase (migration.timeout="
            f"{policy.timeout:g} s per GiB of memory and disk, at least {MIN_TIMEOUT:.0f} s for the whole move)")


def _stuck(policy: LivePolicy, now: Figures) -> str:
    return (f"the guest dirties its memory as fast as it is sent: {now.remaining / MiB:.0f} MiB remain and the "
            f"remaining memory reached no new low for {policy.stall:g} s (migration.stall_timeout)")


def decide(policy: LivePolicy, steps: list[tuple[float, int]], timeout: float | None, history: Sequence[Figures],
           current_downtime_ms: int, acted: bool) -> Decision:
    """What to do after the latest reading, `history[-1]`. `timeout` is when the move's time is up, in seconds
    on the clock of `Figures.at` (None: no limit); `acted` says the postcopy/throttle action fired already.

    1. Outside the memory phase (status pre-switchover, device, postcopy-*, completed: QEMU is finishing and
       an abort would lose a post-copy guest; failed, cancelling, cancelled: it is over and the caller reads
       `error`): nothing, neither a downtime nor an action.
    2. The allowed downtime rises to the step in force (`downtime_at`) when that is above the current one;
       it never goes down.
    3. Not acted yet, and the timeout passed or the move `stalled`: the configured action, once: "abort" for
       abort, "postcopy" for postcopy, "throttle" for auto-converge, with a reason saying what to change.
    4. Acted already (post-copy did not start, or the throttle did not help) and the timeout passed by a further
       half of itself (ESCALATION): "abort"."""
    if not history or history[-1].status not in PRECOPY:
        return Decision()
    now = history[-1]
    step = downtime_at(steps, now.at)
    raise_to = step if step > current_downtime_ms else None
    if acted:
        if timeout is not None and now.at >= timeout * ESCALATION:
            return Decision(raise_to, "abort",
                            f"{_late(policy, timeout * ESCALATION)}, even after "
                            f"migration.timeout_action={policy.action} fired: set a larger migration.timeout, "
                            "allow more downtime (migration.downtime), or stop the VM and move it with --stateless")
        return Decision(raise_to)
    if timeout is not None and now.at >= timeout:
        why = _late(policy, timeout)
    elif stalled(history, policy.stall):
        why = _stuck(policy, now)
    else:
        return Decision(raise_to)
    if policy.action == "abort":
        return Decision(raise_to, "abort", f"{why}: {_REMEDY}")
    return Decision(raise_to, "postcopy" if policy.action == "postcopy" else "throttle",
                    f"{why}: {_DOING[policy.action]} (migration.timeout_action={policy.action})")


def capabilities(policy: LivePolicy) -> list[dict[str, Any]]:
    """migrate-set-capabilities, before `migrate`: events and pause-before-switchover always (the loop ends the
    disk mirror inside the pause); auto-converge only for the auto-converge action, postcopy-ram only for the
    postcopy action (QEMU takes both only before the migration starts)."""
    return [{"capability": "events", "state": True},
            {"capability": "pause-before-switchover", "state": True},
            {"capability": "auto-converge", "state": policy.action == "auto-converge"},
            {"capability": "postcopy-ram", "state": policy.action == "postcopy"}]


def mirror_speed(policy: LivePolicy) -> int:
    """blockdev-mirror's `speed` (bytes/s): the disk shares the link under the same cap as the memory, so a
    mirror never takes more of it than `migration.bandwidth` allows; 0 (the mirror's "no cap") for UNLIMITED."""
    return 0 if policy.bandwidth >= UNLIMITED else policy.bandwidth


MIRROR_BUFFER_MAX = 16 * 2**20  # bytes: QEMU's own buf-size
MIRROR_BUFFER_MIN = 2**20


def mirror_buffer(policy: LivePolicy) -> int:
    """blockdev-mirror's `buf-size` (bytes in flight): a quarter second's worth of the cap, from
    MIRROR_BUFFER_MIN to MIRROR_BUFFER_MAX. QEMU's rate limit sends a whole buffer, then waits for the cap to
    catch up: with its 16 MiB under a 2 MiB/s cap the link lay silent for 8 s at a time, long enough for the
    target to take it for dead."""
    return max(MIRROR_BUFFER_MIN, min(MIRROR_BUFFER_MAX, policy.bandwidth // 4))


def parameters(policy: LivePolicy, steps: list[tuple[float, int]]) -> dict[str, Any]:
    """migrate-set-parameters, before `migrate`: the bandwidth cap and the first step's downtime; with
    auto-converge its throttle, from THROTTLE_INITIAL by THROTTLE_INCREMENT, capped at INITIAL_MAX_THROTTLE
    until the "throttle" action raises the cap to MAX_THROTTLE."""
    found: dict[str, Any] = {"max-bandwidth": policy.bandwidth, "downtime-limit": steps[0][1]}
    if policy.action == "auto-converge":
        found.update({"cpu-throttle-initial": THROTTLE_INITIAL, "cpu-throttle-increment": THROTTLE_INCREMENT,
                      "max-cpu-throttle": INITIAL_MAX_THROTTLE})
    return found


_VERSION = re.compile(r"\s*(\d+)\.(\d+)(?:\.\d+)?\b")


def version_refusal(accel: str, qemu_version: str) -> str | None:
    """None when a live move is safe with this accelerator and QEMU. Under TCG a QEMU older than 10 is refused,
    and so is a version that does not parse ("7.2.0", "10.0.2", "10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)" do):
    QEMU 7.2 under TCG corrupted the guest in 6 of 7 pre-copy migrations that needed more than a few passes on
    this kind of host, QEMU 10 in none of 21. Under KVM: None."""
    if accel.strip().lower() != "tcg":
        return None
    match = _VERSION.match(qemu_version)
    if match is not None and int(match.group(1)) >= 10:
        return None
    shown = f"QEMU {qemu_version.strip()}" if match is not None else \
        f"a QEMU whose version is unknown ({qemu_version.strip()!r})"
    return (f"This server runs VMs under TCG with {shown}: QEMU older than 10 under TCG corrupted guests in most "
            "pre-copy migrations on this kind of host, so it does not move VMs live. Install QEMU 10 (on Debian 12 "
            "from bookworm-backports: apt-get install -t bookworm-backports qemu-system-x86 qemu-utils) and "
            "restart the server, or move the VM with --stateless")


def eta(figures: Figures) -> float | None:
    """Seconds left at QEMU's current rate: remaining / (mbps * 1e6 / 8); None while the rate is unknown (0)."""
    if figures.mbps <= 0:
        return None
    return figures.remaining / (figures.mbps * 1e6 / 8)
