"""The buffer sizing rules and the in-flight choice (studio/buffering.py): pure, no studio."""

from __future__ import annotations

import pytest

from studio.buffering import (
    FLOOR_TASKS,
    SAFETY,
    Demand,
    allocate,
    expected_wait_s,
    pick_concurrency,
    smooth,
    wanted_tasks,
)


def test_a_cold_campaign_keeps_the_floor():
    assert wanted_tasks(Demand("c", workers=0, pace_s=30), lead_s=20) == FLOOR_TASKS


def test_the_buffer_grows_with_workers_and_shrinks_with_their_pace():
    lead = 20.0
    few = wanted_tasks(Demand("c", workers=2, pace_s=30), lead)
    many = wanted_tasks(Demand("c", workers=20, pace_s=30), lead)
    slow = wanted_tasks(Demand("c", workers=20, pace_s=120), lead)
    assert few < slow < many
    # 20 workers at 30 s: 20 in hand + 2 x (20/30 tasks/s x 20 s) = 20 + 27
    assert many == 20 + 27


def test_the_buffer_covers_a_longer_lead_time():
    d = Demand("c", workers=10, pace_s=30)
    assert wanted_tasks(d, lead_s=60) > wanted_tasks(d, lead_s=10)


def test_overlap_divides_what_is_needed():
    one = wanted_tasks(Demand("c", workers=12, pace_s=30, places=1), 20)
    three = wanted_tasks(Demand("c", workers=12, pace_s=30, places=3), 20)
    assert three == 4 + 6  # 12 / 3 in hand + ceil(2 x 12 / (30 x 3) x 20)
    assert three < one


def test_never_more_than_the_campaign_can_use():
    assert wanted_tasks(Demand("c", workers=50, pace_s=10, remaining=3), 20) == 3
    assert wanted_tasks(Demand("c", workers=50, pace_s=10, remaining=0), 20) == 0


def test_everything_fits_under_the_cap_unchanged():
    demands = [Demand("a", 4, 30, cost=4), Demand("b", 0, 30, cost=2)]
    got = allocate(demands, {"a": 20, "b": 20}, cap=1000)
    assert got == {"a": wanted_tasks(demands[0], 20), "b": FLOOR_TASKS}


def test_fairness_two_campaigns_share_the_cap_in_proportion_to_demand():
    # both want far more than the cap holds; b has three times a's demand
    a = Demand("a", workers=10, pace_s=60, cost=4)
    b = Demand("b", workers=30, pace_s=60, cost=4)
    got = allocate([a, b], {"a": 600, "b": 600}, cap=400)
    assert sum(got[c] * 4 for c in got) <= 400
    assert got["a"] >= FLOOR_TASKS and got["b"] >= FLOOR_TASKS
    assert got["b"] == pytest.approx(3 * got["a"], rel=0.1)
    assert sum(got[c] * 4 for c in got) > 400 - 2 * 4  # nothing worth a task is left unused


def test_fairness_an_idle_campaign_keeps_its_floor_and_one_near_its_end_gives_back():
    busy = Demand("busy", workers=40, pace_s=20, cost=4)
    idle = Demand("idle", workers=0, pace_s=30, cost=4)
    ending = Demand("ending", workers=40, pace_s=20, cost=4, remaining=5)  # same demand, 5 prompts left
    lead = {"busy": 60, "idle": 60, "ending": 60}
    got = allocate([busy, idle, ending], lead, cap=200)
    assert got["idle"] == FLOOR_TASKS
    assert got["ending"] == 5  # all it can use, less than its half
    assert got["busy"] == (200 - 4 * (got["idle"] + got["ending"])) // 4  # the rest goes to busy


def test_a_cap_below_the_floors_is_shared_evenly():
    demands = [Demand(c, workers=5, pace_s=10, cost=2) for c in "abcd"]
    got = allocate(demands, {}, cap=10)  # 5 tasks for 4 campaigns
    assert sorted(got.values()) == [1, 1, 1, 2]


def test_battles_and_labels_share_by_completions():
    label = Demand("label", workers=10, pace_s=30, cost=8)
    battle = Demand("battle", workers=10, pace_s=30, cost=2)
    got = allocate([label, battle], {"label": 300, "battle": 300}, cap=300)
    # equal demand: equal completions, so the cheaper battles get about 4x the tasks
    assert got["label"] * 8 == pytest.approx(got["battle"] * 2, rel=0.15)


def test_smooth_moves_part_way():
    assert smooth(None, 40.0) == 40.0
    assert smooth(30.0, 40.0, alpha=0.3) == pytest.approx(33.0)


def test_expected_wait():
    d = Demand("c", workers=20, pace_s=30)
    assert expected_wait_s(d, supply_tasks_s=1.0, ready=0) == 0.0  # supply beats 0.67 tasks/s
    assert expected_wait_s(d, supply_tasks_s=0.25, ready=0) == pytest.approx(20 / 0.25 - 30)
    assert expected_wait_s(d, supply_tasks_s=None, ready=0) is None
    assert expected_wait_s(d, supply_tasks_s=None, ready=3) == 0.0
    assert expected_wait_s(Demand("c", 0, 30), supply_tasks_s=None, ready=0) == 0.0


def test_pick_concurrency_takes_the_knee():
    curve = [(1, 20.0), (2, 38.0), (4, 70.0), (8, 120.0), (16, 180.0), (32, 205.0), (64, 210.0)]
    assert pick_concurrency(curve) == 32  # 205 >= 0.9 x 210, 190 is not
    assert pick_concurrency(curve, knee=0.8) == 16
    assert pick_concurrency([(4, 10.0)]) == 4
    # a curve that falls after its peak picks the peak's side, not the overloaded end
    assert pick_concurrency([(1, 10.0), (8, 100.0), (64, 60.0)]) == 8
    with pytest.raises(ValueError):
        pick_concurrency([])


def test_safety_is_more_than_one():
    assert SAFETY > 1
