"""The wave planner of a NanoGPTRollout: which models go in which wave. Pure, no I/O.

Semantics (documented in README.md, "Cluster-wide model rollouts"):

- Order: the selected models are sorted by (namespace, name), so the same selection always gives the
  same plan, whatever order the API listed them in.
- Sizes are cumulative: `waves: [1, 25%, 100%]` means "after wave 1 at least 1 model is on the target,
  after wave 2 at least 25% of the selection, after wave 3 all of it".
- A percentage is of the whole selection (models already on the target included) and rounds up, with at
  least 1: 25% of 10 is 3, 1% of 10 is 1. A count above the selection is capped at the selection.
- A list whose last entry does not reach the whole selection gets an implicit final 100% wave: a rollout
  never reports Succeeded with models left behind.
- Models already on the target count as done: they fill the cumulative quota first, so their own waves
  need no work. A wave with nothing left to do is dropped from the plan.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from nanogpt_operator.errors import SpecError

Key = tuple[str, str]  # (namespace, name) of a NanoGPTModel

_PERCENT = re.compile(r"^([0-9]{1,3})%$")


@dataclass(frozen=True)
class WaveSize:
    """One entry of spec.strategy.waves: an absolute count or a percentage of the selection."""

    count: int | None = None
    percent: int | None = None

    def cumulative(self, total: int) -> int:
        """How many of `total` selected models must be done once this wave is over."""
        if total == 0:
            return 0
        if self.percent is not None:
            wanted = -(-self.percent * total // 100)  # ceil without floats
        else:
            wanted = self.count or 0
        return min(total, max(1, wanted))


def parse_wave(value: object, path: str) -> WaveSize:
    """`3`, `"3"` or `"25%"`; anything else raises SpecError naming `path`."""
    if isinstance(value, bool):  # bool is an int in Python; `true` is not a wave size
        raise SpecError(path, f"must be a count or a percentage such as 25%, got {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        count = int(value)
        if count < 1:
            raise SpecError(path, f"a count must be at least 1, got {count}")
        return WaveSize(count=count)
    match = _PERCENT.match(value) if isinstance(value, str) else None
    if match is None:
        raise SpecError(path, f"must be a count or a percentage such as 25%, got {value!r}")
    percent = int(match.group(1))
    if not 1 <= percent <= 100:
        raise SpecError(path, f"a percentage must be in [1%, 100%], got {value}")
    return WaveSize(percent=percent)


def parse_waves(values: Sequence[object], path: str) -> tuple[WaveSize, ...]:
    if not values:
        raise SpecError(path, "must list at least one wave")
    return tuple(parse_wave(v, f"{path}[{i}]") for i, v in enumerate(values))


def cumulative_targets(sizes: Sequence[WaveSize], total: int) -> list[int]:
    """Done-after-each-wave counts: non-decreasing, ending at `total` (the implicit 100% wave)."""
    targets: list[int] = []
    for size in sizes:
        targets.append(max(size.cumulative(total), targets[-1] if targets else 0))
    if not targets or targets[-1] < total:
        targets.append(total)
    return targets


def plan_waves(selected: Collection[Key], done: Collection[Key], sizes: Sequence[WaveSize]) -> list[tuple[Key, ...]]:
    """The models to update in each wave, in stable order; models in `done` need no wave.

    `done` models fill the quota first, then the rest take their places in (namespace, name) order.
    Empty waves are dropped, so every wave in the result has work.
    """
    done_set = set(done) & set(selected)
    todo = sorted(set(selected) - done_set)
    waves: list[tuple[Key, ...]] = []
    taken = len(done_set)
    for target in cumulative_targets(sizes, len(set(selected))):
        if target > taken:
            waves.append(tuple(todo[taken - len(done_set):target - len(done_set)]))
            taken = target
    return waves
