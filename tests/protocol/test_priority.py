"""Queue order properties: kudos buy a bounded head start, waiting always wins in the end."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.priority import (
    KUDOS_CAP,
    Aging,
    Waiting,
    effective_time,
    max_head_start,
    order,
    position,
    priority,
)

AGING = Aging(seconds_per_doubling=60.0, anonymous_penalty=600.0)

agings = st.builds(
    Aging,
    seconds_per_doubling=st.floats(0, 3600, allow_nan=False),
    anonymous_penalty=st.floats(0, 36_000, allow_nan=False),
)
waiting_jobs = st.lists(
    st.builds(
        Waiting,
        job_id=st.uuids().map(str),
        account_id=st.integers(1, 6),
        kudos=st.integers(-1000, 2**63),
        created_at=st.floats(0, 1e6, allow_nan=False),
        anonymous=st.booleans(),
    ),
    max_size=30,
    unique_by=lambda job: job.job_id,
)


@given(jobs=waiting_jobs, aging=agings, seed=st.integers(0, 2**32))
def test_order_is_a_deterministic_permutation(jobs: list[Waiting], aging: Aging, seed: int) -> None:
    shuffled = list(jobs)
    random.Random(seed).shuffle(shuffled)
    ranked = order(jobs, aging)
    assert sorted(j.job_id for j in ranked) == sorted(j.job_id for j in jobs)
    assert order(shuffled, aging) == ranked
    for index, job in enumerate(ranked):
        assert position(jobs, job.job_id, aging) == index
    assert position(jobs, "not-there", aging) is None


@given(a=st.integers(0, KUDOS_CAP), b=st.integers(0, KUDOS_CAP), at=st.floats(0, 1e6), aging=agings)
def test_more_kudos_never_ranks_later_for_the_same_submit_time(
    a: int, b: int, at: float, aging: Aging
) -> None:
    rich, poor = max(a, b), min(a, b)
    jobs = [Waiting("poor", 1, poor, at), Waiting("rich", 2, rich, at)]
    if rich > poor and aging.seconds_per_doubling > 0:
        assert [j.job_id for j in order(jobs, aging)] == ["rich", "poor"]
    assert priority(jobs[1], at, aging) >= priority(jobs[0], at, aging)


@given(kudos=st.integers(0, 2**63), at=st.floats(0, 1e6), aging=agings)
def test_anonymous_ranks_after_registered_submitted_at_the_same_time(
    kudos: int, at: float, aging: Aging
) -> None:
    registered = Waiting("user", 1, 0, at)
    anonymous = Waiting("anon", 2, kudos, at, anonymous=True)
    assert order([anonymous, registered], aging)[0] is registered


@given(jobs=waiting_jobs, aging=agings, wait=st.floats(0, 1e5))
def test_priority_grows_one_per_second_of_waiting(
    jobs: list[Waiting], aging: Aging, wait: float
) -> None:
    for job in jobs:
        now = job.created_at + wait
        assert abs(priority(job, now + 10, aging) - priority(job, now, aging) - 10) < 1e-6


@given(early=waiting_jobs, late=waiting_jobs, aging=agings)
def test_no_starvation_a_job_waiting_longer_than_the_bound_runs_first(
    early: list[Waiting], late: list[Waiting], aging: Aging
) -> None:
    """Whatever the kudos, a job submitted `max_head_start` before another runs first."""
    bound = max_head_start(aging)
    if not early:
        return
    old = early[0]
    newcomers = [
        Waiting(
            j.job_id + "-late",
            j.account_id,
            j.kudos,
            old.created_at + bound + 1 + j.created_at,
            j.anonymous,
        )
        for j in late
    ]
    ranked = order([old, *newcomers], aging)
    assert ranked[0] is old
    assert all(effective_time(old, aging) < effective_time(j, aging) for j in newcomers)


@given(jobs=waiting_jobs, owner=st.integers(1, 6), aging=agings)
def test_a_worker_serves_its_owners_jobs_first(
    jobs: list[Waiting], owner: int, aging: Aging
) -> None:
    ranked = order(jobs, aging, owner=owner)
    mine = [j.account_id == owner for j in ranked]
    assert mine == sorted(mine, reverse=True)
    # and among the owner's jobs (and among the others) the usual order holds
    assert [j for j in ranked if j.account_id == owner] == order(
        [j for j in jobs if j.account_id == owner], aging
    )


@settings(max_examples=25, deadline=None)
@given(rich_kudos=st.integers(1, 10**6), service=st.floats(1.1, 3.0), arrival=st.floats(0.5, 1.0))
def test_a_poor_job_runs_before_any_later_flood_under_a_flood_of_rich_jobs(
    rich_kudos: int, service: float, arrival: float
) -> None:
    """One worker, one poor job at t=0, rich jobs arriving faster than they are served:
    only rich jobs submitted within their head start run before it, then it runs."""
    aging = Aging(seconds_per_doubling=1.0, anonymous_penalty=30.0)
    head_start = max_head_start(aging) - aging.anonymous_penalty
    poor = Waiting("poor", 1, 0, 0.0)
    queue = [poor]
    now, arrived = 0.0, 0
    served_before: list[Waiting] = []
    while True:
        while arrived * arrival <= now:
            queue.append(Waiting(f"rich-{arrived}", 2, rich_kudos, arrived * arrival))
            arrived += 1
        served = order(queue, aging)[0]
        queue.remove(served)
        if served is poor:
            break
        served_before.append(served)
        now += service
    assert all(job.created_at <= head_start for job in served_before)
    assert now <= (head_start / arrival + 1) * service
