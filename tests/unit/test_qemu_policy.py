"""The live-move policy of a VM (qemu_policy.py), on query-migrate answers shaped as QEMU 10 returns them."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from stapes.api.errors import BadRequest
from stapes.server.instances.qemu_policy import (
    INITIAL_MAX_THROTTLE,
    KEYS,
    MAX_THROTTLE,
    MIN_TIMEOUT,
    UNLIMITED,
    Decision,
    Figures,
    GiB,
    LivePolicy,
    capabilities,
    check_config,
    completion_timeout,
    decide,
    downtime_at,
    downtime_steps,
    eta,
    mirror_buffer,
    mirror_speed,
    parameters,
    stalled,
    version_refusal,
)

MiB = 2**20

# query-migrate answers as QEMU 10.0 gives them for a 256 MiB guest (fields the policy ignores kept, as QEMU
# sends them).
SETUP: dict[str, Any] = {"status": "setup"}
ACTIVE: dict[str, Any] = {
    "status": "active", "setup-time": 3, "total-time": 412, "expected-downtime": 300,
    "ram": {"total": 268_828_672, "transferred": 150_873_431, "remaining": 118_161_408, "duplicate": 14_022,
            "normal": 36_712, "normal-bytes": 150_372_352, "dirty-pages-rate": 0, "mbps": 2946.37,
            "dirty-sync-count": 1, "postcopy-requests": 0, "page-size": 4096, "multifd-bytes": 0,
            "pages-per-second": 89_952, "precopy-bytes": 150_873_431, "downtime-bytes": 0, "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0},
}
ACTIVE_DIRTYING: dict[str, Any] = {
    "status": "active", "setup-time": 3, "total-time": 1180, "expected-downtime": 27,
    "cpu-throttle-percentage": 30,
    "ram": {"total": 268_828_672, "transferred": 412_316_860, "remaining": 9_437_184, "duplicate": 30_117,
            "normal": 98_890, "normal-bytes": 405_053_440, "dirty-pages-rate": 31_250, "mbps": 2764.1,
            "dirty-sync-count": 4, "postcopy-requests": 0, "page-size": 4096, "multifd-bytes": 0,
            "pages-per-second": 84_350, "precopy-bytes": 412_316_860, "downtime-bytes": 0, "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0},
}
PRE_SWITCHOVER: dict[str, Any] = {
    "status": "pre-switchover", "setup-time": 3, "total-time": 1402, "expected-downtime": 24,
    "ram": {"total": 268_828_672, "transferred": 420_706_013, "remaining": 6_291_456, "duplicate": 30_240,
            "normal": 100_938, "normal-bytes": 413_442_048, "dirty-pages-rate": 29_870, "mbps": 2690.5,
            "dirty-sync-count": 5, "postcopy-requests": 0, "page-size": 4096, "multifd-bytes": 0},
}
COMPLETED: dict[str, Any] = {
    "status": "completed", "setup-time": 3, "total-time": 1437, "downtime": 21,
    "ram": {"total": 268_828_672, "transferred": 427_113_215, "remaining": 0, "duplicate": 30_240,
            "normal": 102_474, "normal-bytes": 419_733_504, "dirty-pages-rate": 29_870, "mbps": 2412.9,
            "dirty-sync-count": 6, "postcopy-requests": 0, "page-size": 4096, "multifd-bytes": 0},
}
FAILED: dict[str, Any] = {"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"}


def reading(at: float, remaining: int, iteration: int = 3, status: str = "active") -> Figures:
    """An ACTIVE_DIRTYING answer with its remaining memory, pass and status changed."""
    answer = copy.deepcopy(ACTIVE_DIRTYING)
    answer["status"] = status
    answer["ram"].update(remaining=remaining, **{"dirty-sync-count": iteration})
    return Figures.from_query(answer, at)


# --- Figures ---------------------------------------------------------------------------------------------------

def test_figures_of_an_active_first_pass() -> None:
    assert Figures.from_query(ACTIVE, 0.41) == Figures(
        at=0.41, status="active", transferred=150_873_431, remaining=118_161_408, total=268_828_672, dirty_rate=0,
        page_size=4096, mbps=2946.37, iteration=1, expected_downtime_ms=300, downtime_ms=None, throttle_percent=0,
        error="")


def test_figures_of_a_dirtying_guest_under_auto_converge() -> None:
    f = Figures.from_query(ACTIVE_DIRTYING, 1.18)
    assert (f.remaining, f.dirty_rate, f.iteration, f.expected_downtime_ms, f.throttle_percent) == (
        9_437_184, 31_250, 4, 27, 30)


def test_figures_of_pre_switchover_completed_setup_and_failed() -> None:
    pre = Figures.from_query(PRE_SWITCHOVER, 1.4)
    assert (pre.status, pre.remaining, pre.iteration, pre.downtime_ms) == ("pre-switchover", 6_291_456, 5, None)
    done = Figures.from_query(COMPLETED, 1.44)
    assert (done.status, done.downtime_ms, done.remaining, done.transferred, done.expected_downtime_ms) == (
        "completed", 21, 0, 427_113_215, None)
    setup = Figures.from_query(SETUP, 0.0)
    assert setup == Figures(at=0.0, status="setup")
    assert (setup.remaining, setup.page_size, setup.mbps, setup.error) == (0, 4096, 0.0, "")
    failed = Figures.from_query(FAILED, 2.5)
    assert (failed.status, failed.error, failed.transferred) == ("failed", "Unable to write to socket: Broken pipe", 0)


@pytest.mark.parametrize("junk", ["12", 1.5, True, None, -4, [1], {"a": 1}])
def test_figures_never_trust_types(junk: Any) -> None:
    answer = {"status": "active", "expected-downtime": junk, "downtime": junk, "cpu-throttle-percentage": junk,
              "error-desc": junk if not isinstance(junk, str) else 7,
              "ram": {key: junk for key in ("transferred", "remaining", "total", "dirty-pages-rate", "page-size",
                                            "dirty-sync-count")}}
    f = Figures.from_query(answer, 1.0)
    assert (f.transferred, f.remaining, f.total, f.dirty_rate, f.iteration, f.throttle_percent) == (0,) * 6
    assert (f.page_size, f.expected_downtime_ms, f.downtime_ms, f.error) == (4096, None, None, "")


@pytest.mark.parametrize("answer", [{}, {"status": 5, "ram": [1, 2]}, {"ram": "x"},
                                    {"status": "active", "ram": {"mbps": "fast"}},
                                    {"status": "active", "ram": {"mbps": float("nan")}},
                                    {"status": "active", "ram": {"mbps": -3.0}},
                                    {"status": "active", "ram": {"mbps": True}}])
def test_figures_of_odd_answers(answer: dict[str, Any]) -> None:
    f = Figures.from_query(answer, 0.5)
    assert (f.status in ("", "active"), f.mbps, f.remaining, f.iteration) == (True, 0.0, 0, 0)
    assert eta(f) is None


def test_eta() -> None:
    assert eta(Figures.from_query(ACTIVE, 0.4)) == 118_161_408 / (2946.37e6 / 8)
    assert eta(Figures.from_query({"status": "active", "ram": {"remaining": 125_000_000, "mbps": 1000}},
                                  0)) == 1.0
    assert eta(Figures.from_query(SETUP, 0)) is None


# --- configuration ---------------------------------------------------------------------------------------------

def test_keys_document_every_key_with_its_default() -> None:
    assert set(KEYS) == {"migration.bandwidth", "migration.downtime", "migration.downtime.steps",
                         "migration.downtime.delay", "migration.timeout", "migration.stall_timeout",
                         "migration.timeout_action"}
    assert all("default" in doc and "\n" not in doc for doc in KEYS.values())


def test_defaults() -> None:
    assert LivePolicy.from_config({}) == LivePolicy() == LivePolicy(
        bandwidth=GiB, downtime_ms=500, downtime_steps=5, downtime_delay=4.0, timeout=60.0, stall=20.0,
        action="abort")
    assert LivePolicy.from_config({key: "" for key in KEYS}) == LivePolicy()
    assert LivePolicy.from_config({"limits.memory": "256MiB", "user.x": "y"}) == LivePolicy()


def test_every_key_read() -> None:
    p = LivePolicy.from_config({"migration.bandwidth": "500MB", "migration.downtime": "200",
                                "migration.downtime.steps": "4", "migration.downtime.delay": "0.5",
                                "migration.timeout": "30", "migration.stall_timeout": "7.5",
                                "migration.timeout_action": "postcopy"})
    assert p == LivePolicy(500_000_000, 200, 4, 0.5, 30.0, 7.5, "postcopy")


@pytest.mark.parametrize(("text", "bandwidth"), [
    ("1GiB", GiB), ("500MB", 500_000_000), ("268435456", 256 * MiB), ("2GiB/s", 2 * GiB), (" 64MiB ", 64 * MiB),
    ("0", UNLIMITED), ("0MiB", UNLIMITED), ("unlimited", UNLIMITED), ("Unlimited", UNLIMITED), ("4TiB", UNLIMITED),
])
def test_bandwidth(text: str, bandwidth: int) -> None:
    assert LivePolicy.from_config({"migration.bandwidth": text}).bandwidth == bandwidth


def test_zero_disables_timeout_and_stall() -> None:
    p = LivePolicy.from_config({"migration.timeout": "0", "migration.stall_timeout": "0"})
    assert (p.timeout, p.stall) == (0.0, 0.0)
    assert completion_timeout(p, GiB, GiB) is None
    assert not stalled([reading(0, 50 * MiB), reading(100, 60 * MiB)], p.stall)


@pytest.mark.parametrize(("key", "value"), [
    ("migration.bandwidth", "fast"), ("migration.bandwidth", "-1GiB"), ("migration.bandwidth", "1.5GiB"),
    ("migration.bandwidth", "10Gbit"),
    ("migration.downtime", "0"), ("migration.downtime", "60001"), ("migration.downtime", "500.5"),
    ("migration.downtime", "-5"), ("migration.downtime", "500ms"),
    ("migration.downtime.steps", "0"), ("migration.downtime.steps", "101"), ("migration.downtime.steps", "2.5"),
    ("migration.downtime.delay", "0"), ("migration.downtime.delay", "-1"), ("migration.downtime.delay", "nan"),
    ("migration.downtime.delay", "4s"),
    ("migration.timeout", "-1"), ("migration.timeout", "inf"), ("migration.timeout", "soon"),
    ("migration.stall_timeout", "x"), ("migration.stall_timeout", "-0.5"), ("migration.stall_timeout", "90000"),
    ("migration.timeout_action", "pray"), ("migration.timeout_action", "Abort"),
    ("migration.timeout_action", "post-copy"),
])
def test_bad_values_name_the_key_the_value_and_what_it_takes(key: str, value: str) -> None:
    for check in (LivePolicy.from_config, check_config):
        with pytest.raises(BadRequest) as raised:
            check({key: value})
        message = raised.value.message
        assert message.startswith(f"Invalid value for {key} {value!r}: it takes ")
        assert "unset it for the default" in message


def test_bad_value_messages() -> None:
    def message(key: str, value: str) -> str:
        with pytest.raises(BadRequest) as raised:
            LivePolicy.from_config({key: value})
        return raised.value.message

    assert message("migration.downtime", "0") == (
        "Invalid value for migration.downtime '0': it takes a whole number of milliseconds from 1 to 60000 "
        "(unset it for the default, 500)")
    assert message("migration.timeout_action", "pray") == (
        "Invalid value for migration.timeout_action 'pray': it takes abort, postcopy or auto-converge "
        "(unset it for the default, abort)")
    assert message("migration.timeout", "-1") == (
        "Invalid value for migration.timeout '-1': it takes 0 (no limit) or a number of seconds up to 86400 "
        "(unset it for the default, 60)")
    assert message("migration.downtime.delay", "0") == (
        "Invalid value for migration.downtime.delay '0': it takes a number of seconds above 0, up to 3600 "
        "(unset it for the default, 4)")
    assert "1GiB, 500MB" in message("migration.bandwidth", "fast")


def test_check_config_accepts_good_values() -> None:
    check_config({})
    check_config({"migration.timeout_action": "auto-converge", "migration.downtime": "60000",
                  "migration.downtime.steps": "100", "limits.cpu": "2"})


# --- downtime steps and the timeout ----------------------------------------------------------------------------

def test_downtime_steps_of_the_defaults() -> None:
    # 2 GiB of memory + disk: a step every 4 s/GiB x 2 GiB = 8 s, from 500/5 = 100 ms to 500 ms.
    assert downtime_steps(LivePolicy(), 2 * GiB) == [
        (0.0, 100), (8.0, 180), (16.0, 260), (24.0, 340), (32.0, 420), (40.0, 500)]


def test_downtime_steps_of_a_small_guest_are_a_second_apart() -> None:
    assert downtime_steps(LivePolicy(), 256 * MiB) == [
        (0.0, 100), (1.0, 180), (2.0, 260), (3.0, 340), (4.0, 420), (5.0, 500)]
    assert downtime_steps(LivePolicy(), 0)[1][0] == 1.0


@pytest.mark.parametrize(("downtime", "steps", "expected"), [
    (7, 5, [1, 2, 3, 4, 5, 7]),  # base 7 // 5 = 1
    (3, 5, [1, 1, 1, 2, 2, 3]),  # below one ms a step: base at least 1 ms
    (1, 1, [1, 1]),
    (300, 1, [300, 300]),
    (1000, 3, [333, 555, 777, 1000]),
    (60000, 100, [600 + (60000 - 600) * i // 100 for i in range(101)]),
])
def test_downtime_steps_shape(downtime: int, steps: int, expected: list[int]) -> None:
    found = downtime_steps(LivePolicy(downtime_ms=downtime, downtime_steps=steps, downtime_delay=2.0), 3 * GiB)
    assert [ms for _, ms in found] == expected
    assert [at for at, _ in found] == [6.0 * i for i in range(steps + 1)]
    assert found[-1][1] == downtime and sorted(found) == found


def test_downtime_at() -> None:
    steps = downtime_steps(LivePolicy(), GiB)  # 100 ms at 0 s, +80 ms every 4 s
    assert [downtime_at(steps, t) for t in (-1.0, 0.0, 3.99, 4.0, 7.0, 8.0, 19.99, 20.0, 1e6)] == [
        100, 100, 100, 180, 180, 260, 420, 500, 500]
    with pytest.raises(ValueError):
        downtime_at([], 1.0)


def test_completion_timeout() -> None:
    p = LivePolicy()
    assert completion_timeout(p, 256 * MiB, 256 * MiB) == MIN_TIMEOUT == 60.0  # the floor
    assert completion_timeout(p, 256 * MiB, 0) == 60.0
    assert completion_timeout(p, GiB, GiB // 2) == 90.0
    assert completion_timeout(p, 4 * GiB, 4 * GiB) == 480.0
    assert completion_timeout(LivePolicy(timeout=10), 4 * GiB, 0) == 60.0
    assert completion_timeout(LivePolicy(timeout=10), 8 * GiB, 0) == 80.0
    assert completion_timeout(LivePolicy(timeout=0), 64 * GiB, 64 * GiB) is None
    # A lower floor (the tests that make the timeout fire) still never cuts the per-GiB figure.
    assert completion_timeout(LivePolicy(timeout=10), 128 * MiB, 0, floor=2) == 2
    assert completion_timeout(LivePolicy(timeout=10), 4 * GiB, 0, floor=2) == 40


def test_the_mirror_shares_the_bandwidth_cap() -> None:
    assert mirror_speed(LivePolicy(bandwidth=4 * MiB)) == 4 * MiB
    assert mirror_speed(LivePolicy.from_config({"migration.bandwidth": "unlimited"})) == 0  # 0: no cap for QEMU


def test_the_mirror_buffer_keeps_the_link_busy_under_a_cap() -> None:
    assert mirror_buffer(LivePolicy(bandwidth=8 * MiB)) == 2 * MiB  # a quarter second's worth
    assert mirror_buffer(LivePolicy(bandwidth=2 * MiB)) == MiB  # never below 1 MiB
    assert mirror_buffer(LivePolicy()) == 16 * MiB  # QEMU's own, for the 1 GiB/s default and above
    assert mirror_buffer(LivePolicy.from_config({"migration.bandwidth": "0"})) == 16 * MiB


# --- stalls ----------------------------------------------------------------------------------------------------

def test_remaining_shrinking_is_no_stall() -> None:
    shrinking = [reading(t, (100 - 2 * t) * MiB) for t in range(40)]
    assert not stalled(shrinking, 20)


def test_remaining_stuck_is_a_stall_after_stall_seconds() -> None:
    stuck = [reading(0, 50 * MiB), *[reading(t, 60 * MiB) for t in range(1, 21)]]
    assert not stalled(stuck[:20], 20)  # 19 s since the low at 0 s
    assert stalled(stuck, 20)  # 20 s
    assert not stalled(stuck, 30)
    assert not stalled(stuck, 0)


def test_passes_going_up_and_down_without_a_new_low_stall() -> None:
    # Each pass starts again at 60 MiB and gets down to 11 MiB (first at 1.75 s), never lower: no progress.
    passes = [reading(t / 4, (60 - (t % 8) * 7) * MiB, iteration=2 + t // 8) for t in range(90)]
    assert min(f.remaining for f in passes) == 11 * MiB and passes[-1].at == 22.25
    assert stalled(passes, 20)  # 20.5 s since 1.75 s
    assert not stalled(passes, 21)


def test_a_new_low_restarts_the_clock() -> None:
    history = [reading(0, 50 * MiB), *[reading(t, 60 * MiB) for t in range(1, 15)], reading(15, 49 * MiB),
               *[reading(t, 60 * MiB) for t in range(16, 35)]]
    assert not stalled(history, 20)  # 19 s since the low at 15 s
    assert stalled([*history, reading(35, 60 * MiB)], 20)
    assert stalled([*history, reading(35, 49 * MiB)], 20)  # equal to the low is no new low
    assert not stalled([*history, reading(35, 48 * MiB)], 20)


def test_first_pass_is_no_stall() -> None:
    first_pass = [reading(t, 60 * MiB, iteration=1) for t in range(40)]
    assert not stalled(first_pass, 20)
    # The end of the first pass (its remaining near 0) sets no low for the passes that follow.
    history = [*[reading(t, (200 - 10 * t) * MiB, iteration=1) for t in range(20)],
               *[reading(t, 30 * MiB, iteration=2) for t in range(20, 40)]]
    assert not stalled(history, 20)
    assert stalled([*history, reading(40, 30 * MiB, iteration=3)], 20)


def test_setup_readings_set_no_low() -> None:
    # QEMU's setup answer has no ram figures: its remaining reads 0, which must not count as a low.
    history = [Figures.from_query(SETUP, 0.0), *[reading(t, (60 - t) * MiB) for t in range(1, 30)]]
    assert history[0].remaining == 0
    assert not stalled(history, 20)


def test_fewer_than_two_readings_or_outside_the_memory_phase_is_no_stall() -> None:
    assert not stalled([], 20)
    assert not stalled([reading(100, 60 * MiB)], 20)
    stuck = [reading(0, 50 * MiB), *[reading(t, 60 * MiB) for t in range(1, 30)]]
    assert not stalled([*stuck, reading(30, 60 * MiB, status="pre-switchover")], 20)


# --- decisions -------------------------------------------------------------------------------------------------

STEPS = downtime_steps(LivePolicy(), GiB)  # 100 ms at 0 s, raised by 80 ms every 4 s to 500 ms at 20 s


def test_downtime_rises_to_the_step_in_force_and_never_down() -> None:
    p = LivePolicy()
    assert decide(p, STEPS, 60, [reading(0.25, 40 * MiB, iteration=1)], 100, False) == Decision()
    assert decide(p, STEPS, 60, [reading(5, 40 * MiB)], 100, False) == Decision(downtime_ms=180)
    assert decide(p, STEPS, 60, [reading(5, 40 * MiB)], 180, False) == Decision()
    assert decide(p, STEPS, 60, [reading(9, 40 * MiB)], 100, False) == Decision(downtime_ms=260)  # skips a step
    assert decide(p, STEPS, 60, [reading(5, 40 * MiB)], 400, False) == Decision()  # never down


def test_timeout_aborts_by_default() -> None:
    p = LivePolicy()
    assert decide(p, STEPS, 120, [reading(119.75, 40 * MiB)], 500, False) == Decision()
    assert decide(p, STEPS, 120, [reading(120, 40 * MiB)], 500, False) == Decision(
        action="abort",
        reason="the migration did not complete within 120 s of its memory phase (migration.timeout=60 s per GiB "
               "of memory and disk, at least 60 s for the whole move): set a larger migration.timeout, allow more "
               "downtime (migration.downtime), or set migration.timeout_action=postcopy or auto-converge")
    assert decide(p, STEPS, 120, [reading(121, 40 * MiB)], 100, False).downtime_ms == 500  # raised as well


def test_stall_fires_the_action_before_the_timeout() -> None:
    stuck = [reading(0, 50 * MiB), *[reading(t, 60 * MiB) for t in range(1, 21)]]
    decision = decide(LivePolicy(), STEPS, 600, stuck, 500, False)
    assert decision == Decision(
        action="abort",
        reason="the guest dirties its memory as fast as it is sent: 60 MiB remain and the remaining memory "
               "reached no new low for 20 s (migration.stall_timeout): set a larger migration.timeout, allow more "
               "downtime (migration.downtime), or set migration.timeout_action=postcopy or auto-converge")
    assert decide(LivePolicy(stall=0), STEPS, 600, stuck, 500, False) == Decision()
    assert decide(LivePolicy(), STEPS, 600, stuck[:-1], 500, False) == Decision()


def test_postcopy_action_then_escalation() -> None:
    post = LivePolicy(action="postcopy")
    late = decide(post, STEPS, 60, [reading(60, 40 * MiB)], 500, False)
    assert late.action == "postcopy" and late.downtime_ms is None
    assert late.reason.startswith("the migration did not complete within 60 s of its memory phase")
    assert late.reason.endswith(": switching to post-copy (the guest runs on the target, its memory follows) "
                                "(migration.timeout_action=postcopy)")
    assert decide(post, STEPS, 60, [reading(61, 40 * MiB)], 500, True) == Decision()  # once only
    assert decide(post, STEPS, 60, [reading(89.75, 40 * MiB)], 500, True) == Decision()
    assert decide(post, STEPS, 60, [reading(90, 40 * MiB)], 500, True) == Decision(
        action="abort",
        reason="the migration did not complete within 90 s of its memory phase (migration.timeout=60 s per GiB of "
               "memory and disk, at least 60 s for the whole move), even after migration.timeout_action=postcopy "
               "fired: set a larger migration.timeout, allow more downtime (migration.downtime), or stop the VM "
               "and move it with --stateless")


def test_auto_converge_throttles_then_aborts() -> None:
    auto = LivePolicy(action="auto-converge")
    stuck = [reading(0, 50 * MiB), *[reading(t, 60 * MiB) for t in range(1, 21)]]
    decision = decide(auto, STEPS, 300, stuck, 500, False)
    assert decision.action == "throttle"
    assert decision.reason.endswith(f"throttling the guest's CPUs harder (up to {MAX_THROTTLE}%) "
                                    "(migration.timeout_action=auto-converge)")
    more = [*stuck, *[reading(t, 60 * MiB) for t in range(21, 100)]]
    assert decide(auto, STEPS, 300, more, 500, True) == Decision()  # stalled again: no second throttle, no abort
    assert decide(auto, STEPS, 300, [*more, reading(450, 60 * MiB)], 500, True).action == "abort"


def test_acted_without_a_timeout_never_aborts() -> None:
    stuck = [reading(0, 50 * MiB), *[reading(t, 60 * MiB) for t in range(1, 2000, 10)]]
    assert decide(LivePolicy(action="postcopy", timeout=0), STEPS, None, stuck, 500, True) == Decision()
    assert decide(LivePolicy(action="postcopy", timeout=0), STEPS, None, stuck, 500, False).action == "postcopy"


@pytest.mark.parametrize("status", ["pre-switchover", "device", "postcopy-active", "postcopy-paused",
                                    "postcopy-recover", "completed", "failed", "cancelling", "cancelled"])
def test_nothing_once_qemu_is_finishing_or_over(status: str) -> None:
    for policy in (LivePolicy(), LivePolicy(action="postcopy"), LivePolicy(action="auto-converge")):
        for acted in (False, True):
            late = [reading(0, 50 * MiB), *[reading(t, 60 * MiB) for t in range(1, 200)],
                    reading(200, 60 * MiB, status=status)]
            assert decide(policy, STEPS, 60, late, 100, acted) == Decision()


def test_failed_answer_gives_nothing_and_keeps_qemus_error() -> None:
    failed = Figures.from_query(FAILED, 200.0)
    assert decide(LivePolicy(), STEPS, 60, [reading(199, 1 * MiB), failed], 100, False) == Decision()
    assert failed.error == "Unable to write to socket: Broken pipe"


def test_a_recorded_dirtying_move() -> None:
    # A 256 MiB guest dirtying ~128 MiB/s: setup, the first pass, three passes, the pause (1.2-1.7 s measured).
    steps = downtime_steps(LivePolicy(), 256 * MiB + GiB)  # 5 s apart
    timeout = completion_timeout(LivePolicy(), 256 * MiB, GiB)
    assert timeout == 75.0
    history: list[Figures] = []
    decisions = []
    for at, answer in [(0.0, SETUP), (0.4, ACTIVE), (1.2, ACTIVE_DIRTYING), (1.4, PRE_SWITCHOVER)]:
        history.append(Figures.from_query(answer, at))
        decisions.append(decide(LivePolicy(), steps, timeout, history, steps[0][1], False))
    assert decisions == [Decision()] * 4
    assert not stalled(history, 20)


# --- QEMU's settings -------------------------------------------------------------------------------------------

def test_capabilities() -> None:
    def states(action: str) -> dict[str, bool]:
        return {c["capability"]: c["state"] for c in capabilities(LivePolicy(action=action))}

    assert states("abort") == {"events": True, "pause-before-switchover": True, "auto-converge": False,
                               "postcopy-ram": False}
    assert states("postcopy") == {"events": True, "pause-before-switchover": True, "auto-converge": False,
                                  "postcopy-ram": True}
    assert states("auto-converge") == {"events": True, "pause-before-switchover": True, "auto-converge": True,
                                       "postcopy-ram": False}


def test_parameters() -> None:
    p = LivePolicy()
    assert parameters(p, downtime_steps(p, GiB)) == {"max-bandwidth": GiB, "downtime-limit": 100}
    post = LivePolicy(action="postcopy", bandwidth=UNLIMITED, downtime_ms=30, downtime_steps=3)
    assert parameters(post, downtime_steps(post, GiB)) == {"max-bandwidth": 1 << 40, "downtime-limit": 10}
    auto = LivePolicy(action="auto-converge")
    assert parameters(auto, downtime_steps(auto, GiB)) == {
        "max-bandwidth": GiB, "downtime-limit": 100, "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
        "max-cpu-throttle": INITIAL_MAX_THROTTLE}
    assert (INITIAL_MAX_THROTTLE, MAX_THROTTLE) == (50, 99)


# --- QEMU versions ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("accel", "version"), [
    ("tcg", "10.0.2"), ("tcg", "10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)"), ("tcg", "10.1"), ("tcg", "11.0.0"),
    ("kvm", "7.2.0"), ("kvm", ""), ("kvm", "garbage"),
])
def test_versions_allowed(accel: str, version: str) -> None:
    assert version_refusal(accel, version) is None


@pytest.mark.parametrize("version", ["7.2.0", "7.2.19 (Debian 1:7.2+dfsg-7+deb12u16)", "9.2.0", "8.2.2"])
def test_older_qemu_under_tcg_refused(version: str) -> None:
    assert version_refusal("tcg", version) == (
        f"This server runs VMs under TCG with QEMU {version}: QEMU older than 10 under TCG corrupted guests in "
        "most pre-copy migrations on this kind of host, so it does not move VMs live. Install QEMU 10 (on Debian "
        "12 from bookworm-backports: apt-get install -t bookworm-backports qemu-system-x86 qemu-utils) and "
        "restart the server, or move the VM with --stateless")


@pytest.mark.parametrize("version", ["", "garbage", "ten", "10", "v10.0.2"])
def test_unparseable_version_under_tcg_refused(version: str) -> None:
    refusal = version_refusal("tcg", version)
    assert refusal is not None
    assert refusal.startswith(f"This server runs VMs under TCG with a QEMU whose version is unknown ({version!r})")
    assert "bookworm-backports" in refusal and "--stateless" in refusal
