"""The live-move policy of a VM, on query-migrate answers as QEMU 10 gives them."""

from __future__ import annotations

import pytest

from stapes.api.errors import BadRequest
from stapes.server.instances.qemu_policy import (
    MIN_TIMEOUT,
    UNLIMITED,
    Figures,
    GiB,
    LivePolicy,
    capabilities,
    completion_timeout,
    decide,
    downtime_at,
    downtime_steps,
    eta,
    parameters,
    stalled,
    version_refusal,
)


def active(at: float, remaining: int, iteration: int = 3, status: str = "active") -> Figures:
    return Figures.from_query({"status": status, "expected-downtime": 40, "cpu-throttle-percentage": 0, "ram": {
        "transferred": 300 << 20, "remaining": remaining, "total": 268_763_136, "dirty-pages-rate": 31_000,
        "mbps": 838.8, "dirty-sync-count": iteration, "page-size": 4096}}, at)


def test_figures_from_query_migrate() -> None:
    f = active(1.5, 12 << 20)
    assert (f.status, f.transferred, f.remaining, f.total, f.dirty_rate, f.iteration) == (
        "active", 300 << 20, 12 << 20, 268_763_136, 31_000, 3)
    assert f.expected_downtime_ms == 40 and f.mbps == 838.8 and f.downtime_ms is None
    done = Figures.from_query({"status": "completed", "downtime": 21, "ram": {"transferred": 5}}, 2.0)
    assert (done.downtime_ms, done.transferred, done.page_size) == (21, 5, 4096)
    odd = Figures.from_query({"status": "failed", "error-desc": "Unable to write", "ram": {"remaining": "x",
                                                                                          "mbps": True}}, 0)
    assert (odd.remaining, odd.mbps, odd.error) == (0, 0.0, "Unable to write")
    assert eta(f) == round((12 << 20) / (838.8e6 / 8), 1) and eta(odd) is None


def test_config_and_its_errors() -> None:
    assert LivePolicy.from_config({}) == LivePolicy(GiB, 500, 5, 4.0, 60.0, 20.0, "abort")
    p = LivePolicy.from_config({"migration.bandwidth": "500MiB", "migration.downtime": "200",
                                "migration.timeout_action": "postcopy", "migration.timeout": "0"})
    assert (p.bandwidth, p.downtime_ms, p.action, p.timeout) == (500 << 20, 200, "postcopy", 0)
    assert LivePolicy.from_config({"migration.bandwidth": "unlimited"}).bandwidth == UNLIMITED
    for key, value in [("migration.bandwidth", "fast"), ("migration.downtime", "0"),
                       ("migration.downtime.steps", "2.5"), ("migration.timeout", "-1"),
                       ("migration.stall_timeout", "x"), ("migration.timeout_action", "pray")]:
        with pytest.raises(BadRequest, match=key.replace(".", r"\.")):
            LivePolicy.from_config({key: value})


def test_downtime_steps_and_timeout() -> None:
    p = LivePolicy()
    steps = downtime_steps(p, 2 * GiB)
    assert steps == [(0.0, 100), (8.0, 180), (16.0, 260), (24.0, 340), (32.0, 420), (40.0, 500)]
    assert downtime_at(steps, 0) == 100 and downtime_at(steps, 17) == 260 and downtime_at(steps, 99) == 500
    assert downtime_steps(p, 1 << 20)[1][0] == 1.0  # a small guest: a step a second at least
    assert completion_timeout(p, 256 << 20, 256 << 20) == MIN_TIMEOUT
    assert completion_timeout(p, 4 * GiB, 4 * GiB) == 480.0
    assert completion_timeout(LivePolicy(timeout=0), GiB, GiB) is None


def test_stall_detection() -> None:
    shrinking = [active(t, (100 - 2 * t) * 2**20) for t in range(30)]
    assert not stalled(shrinking, 20)
    stuck = [active(0, 50 << 20), *[active(t, 60 << 20) for t in range(1, 22)]]
    assert stalled(stuck, 20) and not stalled(stuck, 0) and not stalled(stuck, 30)
    first_pass = [active(t, 60 << 20, iteration=1) for t in range(30)]
    assert not stalled(first_pass, 20)
    assert not stalled(stuck[:1], 20)


def test_decisions() -> None:
    p = LivePolicy()
    steps = downtime_steps(p, GiB)  # a step every 4 s
    assert decide(p, steps, 60, [active(5, 1 << 20)], 100, False).downtime_ms == 180
    assert decide(p, steps, 60, [active(5, 1 << 20)], 180, False).downtime_ms is None
    late = decide(p, steps, 60, [active(61, 1 << 20)], 500, False)
    assert late.action == "abort" and "within 60s" in late.reason and "migration.timeout" in late.reason
    stuck = [active(0, 50 << 20), *[active(t, 60 << 20) for t in range(1, 22)]]
    assert decide(p, steps, 600, stuck, 500, False).action == "abort"
    post = LivePolicy(action="postcopy")
    assert decide(post, steps, 60, [active(61, 1 << 20)], 500, False).action == "postcopy"
    assert decide(post, steps, 60, [active(61, 1 << 20)], 500, True).action is None  # once
    assert decide(post, steps, 60, [active(91, 1 << 20)], 500, True).action == "abort"  # and it did not help
    assert decide(LivePolicy(action="auto-converge"), steps, 60, [active(61, 1)], 500, False).action == "throttle"
    for status in ("pre-switchover", "device", "postcopy-active", "completed", "failed"):
        assert decide(p, steps, 60, [active(99, 1, status=status)], 100, False) == decide(
            p, steps, 60, [active(0, 1, status="completed")], 100, False)
        assert decide(p, steps, 60, [active(99, 1, status=status)], 100, False).action is None


def test_capabilities_and_parameters() -> None:
    caps = {c["capability"]: c["state"] for c in capabilities(LivePolicy())}
    assert caps == {"events": True, "pause-before-switchover": True, "auto-converge": False, "postcopy-ram": False}
    assert {c["capability"]: c["state"] for c in capabilities(LivePolicy(action="postcopy"))}["postcopy-ram"]
    p = LivePolicy(action="auto-converge")
    assert parameters(p, downtime_steps(p, GiB)) == {"max-bandwidth": GiB, "downtime-limit": 100,
                                                     "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                                                     "max-cpu-throttle": 50}


def test_qemu_versions_under_tcg() -> None:
    assert version_refusal("tcg", "10.0.2") is None
    assert version_refusal("tcg", "10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)") is None
    assert version_refusal("kvm", "7.2.0") is None
    refusal = version_refusal("tcg", "7.2.0")
    assert refusal is not None and "QEMU 7.2.0" in refusal and "--stateless" in refusal
    assert version_refusal("tcg", "") is not None and version_refusal("tcg", "garbage") is not None
