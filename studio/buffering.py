"""How many ready tasks each campaign keeps, and how many sequences the sampler keeps in flight.

Pure rules, no store and no clock, so they can be tested on their own. The task sampler
measures the inputs (who is working, how fast, how long a sample takes) and applies them.

A campaign's demand is its active workers (annotators, or experts for a battle campaign)
over their smoothed pace (seconds per task). Its buffer must cover what they take while a
new task is being sampled (the lead time), twice over for bursts, plus one task in hand per
worker so that workers who finish together all find one. All buffers together stay under a
memory cap counted in completions; when the cap binds, each campaign first gets a small
floor and the rest is shared in proportion to demand (water-filling: a campaign that needs
less than its share gives the rest back to the others).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SAFETY = 2.0  # cover twice the lead time's consumption: arrivals come in bursts
FLOOR_TASKS = 2  # a cold campaign (no one working yet) still has a task for its first worker
DEFAULT_PACE_S = 30.0  # seconds per task before anyone's pace has been measured
DEFAULT_LEAD_S = 20.0  # seconds to sample a task before the sampler has measured one
MEMORY_CAP_COMPLETIONS = 1024  # ready completions held by all campaigns together
KNEE = 0.9  # in-flight level: the smallest reaching this share of the best measured throughput


@dataclass(frozen=True)
class Demand:
    """What one campaign needs. `cost` is completions per task (n; 2 for a battle), `places`
    how many different workers each task serves (the overlap; 1 for a battle), `remaining`
    how many more tasks it can still use (None: no limit known)."""

    campaign: str
    workers: int
    pace_s: float
    cost: int = 1
    places: int = 1
    remaining: int | None = None

    @property
    def rate(self) -> float:
        """Tasks per second the campaign's workers use up."""
        if self.workers <= 0:
            return 0.0
        return self.workers / (max(self.pace_s, 1e-3) * max(self.places, 1))


def smooth(previous: float | None, sample: float, alpha: float = 0.3) -> float:
    """Exponentially weighted mean: one slow task moves the pace a little, a trend moves it fully."""
    return sample if previous is None else previous + alpha * (sample - previous)


def wanted_tasks(demand: Demand, lead_s: float, floor: int = FLOOR_TASKS) -> int:
    """The campaign's buffer before the memory cap: one task in hand per worker (a task serves
    `places` of them) plus SAFETY times what they use during one lead time; never below
    `floor`, never above what the campaign can still use."""
    in_hand = math.ceil(demand.workers / max(demand.places, 1)) if demand.workers > 0 else 0
    want = max(floor, in_hand + math.ceil(SAFETY * demand.rate * max(lead_s, 0.0)))
    if demand.remaining is not None:
        want = min(want, max(demand.remaining, 0))
    return want


def allocate(
    demands: Sequence[Demand],
    lead_s: Mapping[str, float],
    cap: int = MEMORY_CAP_COMPLETIONS,
    floor: int = FLOOR_TASKS,
) -> dict[str, int]:
    """Each campaign's buffer in tasks, all together within `cap` completions.

    A campaign gets what it wants when everything fits. Otherwise each first gets up to
    `floor` tasks (fewer when even the floors do not fit, shared evenly), and the completions
    left are shared in proportion to demand, each capped at what it wants, repeating until
    nothing more can be placed."""
    want = {d.campaign: wanted_tasks(d, lead_s.get(d.campaign, DEFAULT_LEAD_S), floor) for d in demands}
    cost = {d.campaign: max(d.cost, 1) for d in demands}
    if sum(want[c] * cost[c] for c in want) <= cap:
        return want
    got = {c: 0 for c in want}
    # floors first, one task at a time round-robin, so a cap below the floors is still even
    for _ in range(floor):
        for c in want:
            if got[c] < want[c] and _spent(got, cost) + cost[c] <= cap:
                got[c] += 1
    rates = {d.campaign: d.rate for d in demands}
    while True:
        open_ = [c for c in want if got[c] < want[c] and rates[c] > 0]
        left = cap - _spent(got, cost)
        if not open_ or left <= 0:
            break
        total = sum(rates[c] for c in open_)
        exact = {c: min(want[c] - got[c], left * rates[c] / total / cost[c]) for c in open_}
        placed = 0
        for c in open_:
            got[c] += int(exact[c])
            placed += int(exact[c])
        # largest remainders next, one task each, so rounding does not favour the biggest
        for c in sorted(open_, key=lambda c: int(exact[c]) - exact[c]):
            if exact[c] > int(exact[c]) and _spent(got, cost) + cost[c] <= cap:
                got[c] += 1
                placed += 1
        if placed == 0:
            break
    return got


def _spent(got: Mapping[str, int], cost: Mapping[str, int]) -> int:
    return sum(got[c] * cost[c] for c in got)


def expected_wait_s(demand: Demand, supply_tasks_s: float | None, ready: int) -> float | None:
    """Seconds a worker waits per task in steady state: none while supply keeps up; else each
    worker gets a place every workers / (supply * places) seconds and spends `pace_s` of it
    working. None when nothing is known (no supply measured and nothing ready)."""
    if demand.workers <= 0:
        return 0.0
    if not supply_tasks_s:
        return 0.0 if ready > 0 else None
    cycle = demand.workers / (supply_tasks_s * max(demand.places, 1))
    return max(0.0, cycle - demand.pace_s)


def pick_concurrency(curve: Sequence[tuple[int, float]], knee: float = KNEE) -> int:
    """Sequences to keep in flight, from measured (sequences in flight, tokens/s) points: the
    smallest level reaching `knee` of the best throughput. Past the knee more in flight adds
    latency (so longer lead times and larger buffers) for little throughput."""
    points = sorted((level, tok_s) for level, tok_s in curve if level > 0)
    if not points:
        raise ValueError("pick_concurrency: the curve has no points")
    best = max(tok_s for _, tok_s in points)
    return next(level for level, tok_s in points if tok_s >= knee * best)
