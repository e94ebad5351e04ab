"""The job lifecycle's statements that run on every job, built once (coordinator.db.prepared):
execute them with the values of their bind parameters."""

from __future__ import annotations

from types import SimpleNamespace

from sqlalchemy import bindparam, select, update

from coordinator.db.schema import balances, jobs, workers

__all__ = [
    "BALANCE_AND_RANKED",
    "FINISH",
    "IMAGE_JOB_BY_ID",
    "INSERT_JOB",
    "JOB_BY_ID",
    "LEASE",
    "ME",
    "WORKER_BY_ID",
    "WORKER_DONE",
    "WORKER_SEEN",
]

INSERT_JOB = jobs.insert()  # its columns are the keys of the parameters
JOB_BY_ID = select(jobs).where(jobs.c.id == bindparam("job_id"))
IMAGE_JOB_BY_ID = select(jobs).where((jobs.c.id == bindparam("job_id")) & (jobs.c.kind == "image"))
WORKER_BY_ID = select(workers).where(workers.c.id == bindparam("worker_id"))
# a requester's balance and the balance its queued jobs are ranked by, in one read
BALANCE_AND_RANKED = select(balances.c.amount, balances.c.ranked).where(
    balances.c.account_id == bindparam("account_id")
)
_AT = bindparam("at", type_=jobs.c.leased_at.type)
# a queued job leased to a worker (conditional: another pop may have taken it): its row,
# or none
LEASE = (
    update(jobs)
    .where((jobs.c.id == bindparam("job_id")) & (jobs.c.state == "queued"))
    .values(
        state="leased",
        worker_id=bindparam("worker", type_=jobs.c.worker_id.type),
        lease_deadline=_AT + jobs.c.lease_seconds,
        leased_at=_AT,
        image=0,
        step=0,
    )
    .returning(*jobs.c)  # the leased job's row (no second statement to read it)
)
# the worker's leased job done (conditional: its lease may have ended meanwhile): its row,
# or none
FINISH = (
    update(jobs)
    .where(
        (jobs.c.id == bindparam("job_id"))
        & (jobs.c.state == "leased")
        & (jobs.c.worker_id == bindparam("worker", type_=jobs.c.worker_id.type))
    )
    .values(state="done", finished_at=_AT, lease_deadline=None)
    .returning(*jobs.c)  # the finished job's row
)
WORKER_DONE = (
    update(workers)
    .where(workers.c.id == bindparam("worker_id"))
    .values(
        jobs_done=workers.c.jobs_done + 1,
        last_seen=bindparam("at", type_=workers.c.last_seen.type),
        faulted_run=0,  # a finished job ends a run of give-backs (--faulted-run)
    )
)
WORKER_SEEN = (
    update(workers)
    .where(workers.c.id == bindparam("worker_id"))
    .values(last_seen=bindparam("at", type_=workers.c.last_seen.type))
)
# a worker as checks.checks_for and checks.related see it, its values bound at execution:
# me_id, me_account, me_ip (an unknown IP, NULL, matches nothing there), me_refiner (its
# refiner setup: coordinator.economy.check_refiner.refiner_setup_of)
ME = SimpleNamespace(
    id=bindparam("me_id", type_=workers.c.id.type),
    account_id=bindparam("me_account", type_=workers.c.account_id.type),
    ip=bindparam("me_ip", type_=workers.c.ip.type),
    refiner=bindparam("me_refiner", type_=jobs.c.check_refiner.type),
)
