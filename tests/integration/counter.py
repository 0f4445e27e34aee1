"""The witness of a live move: a shell loop in the container appends its counter and its PID to a file every
100 ms. After a move the numbers go on from where they were, without a reset or a gap, by the same process."""

from __future__ import annotations

from collections.abc import Callable

from tests.integration.harness import wait_for

LOOP = "i=0; while true; do i=$((i+1)); echo $i $$ >> /root/counter; sleep 0.1; done"
Exec = Callable[[list[str]], str]  # runs a command in the container, returns its stdout


def start(run: Exec) -> tuple[int, int]:
    """Start the loop; (its count so far, its PID). setsid: CRIU checkpoints a container's processes only
    when their session leader is inside it."""
    run(["sh", "-c", f"setsid sh -c '{LOOP}' </dev/null >/dev/null 2>&1 &"])
    wait_for(lambda: len(lines(run)) >= 3, 15, "the counter to count")
    return lines(run)[-1]


def lines(run: Exec) -> list[tuple[int, int]]:
    return [(int(line.split()[0]), int(line.split()[1])) for line in run(["cat", "/root/counter"]).splitlines()
            if len(line.split()) == 2]


def assert_counting(run: Exec, seen: int, pid: int) -> int:
    """The loop runs now (it goes on past `seen` and past what it had written when asked: numbers written
    before a move would not prove it), never restarted, skipped nothing, one process."""
    written = lines(run)[-1][0]
    wait_for(lambda: lines(run)[-1][0] > max(seen, written) + 2, 15, "the counter to go on")
    found = lines(run)
    assert [n for n, _ in found] == list(range(1, len(found) + 1)), "the counter was reset or skipped"
    assert {p for _, p in found} == {pid}, "another process wrote the counter"
    return found[-1][0]
