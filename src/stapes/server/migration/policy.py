"""Live-migration decisions as small pure functions (as Nova's libvirt migration policy): they take figures
and return decisions, so every rule is unit-tested without a container; the loops elsewhere only measure
and ask."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from stapes.api.config_keys import is_true

DEFAULT_GOAL = 70
DEFAULT_ITERATIONS = 10


@dataclass(frozen=True)
class PrecopySettings:
    enabled: bool
    goal: int  # percent of memory already on the target that ends the rounds
    iterations: int  # rounds at most

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> PrecopySettings:
        """`migration.incremental.memory*` (validated by the key table when set)."""
        return cls(enabled=is_true(config.get("migration.incremental.memory")),
                   goal=int(config.get("migration.incremental.memory.goal") or DEFAULT_GOAL),
                   iterations=int(config.get("migration.incremental.memory.iterations") or DEFAULT_ITERATIONS))


def another_precopy_round(settings: PrecopySettings, rounds_done: int, synced_percent: float | None) -> bool:
    """Run one more pre-dump round while the container runs? The first round always runs (nothing is on the
    target yet); after that, stop once the share of memory the last round found unchanged since the round
    before (`100 - 100 * written / (written + skipped)`) reached the goal, or once `iterations` rounds ran.
    The final dump follows either way."""
    if not settings.enabled:
        return False
    if rounds_done >= settings.iterations:
        return False
    if rounds_done == 0 or synced_percent is None:
        return True
    return synced_percent < settings.goal
