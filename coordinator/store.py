"""The coordinator's persistent state as one object, assembled from its concepts:
accounts and balances (coordinator.accounts), workers (coordinator.workers), the one job
lifecycle and the queue (coordinator.jobs.lifecycle, coordinator.jobs.queue) and image jobs
(coordinator.jobs.image); text jobs are functions over it (coordinator.jobs.text).
Create with `await Store.open(config)`; tests may pass `clock=`."""

from __future__ import annotations

from coordinator.accounts import Account, hash_secret
from coordinator.db.database import ANONYMOUS, ESCROW, GRANTS, VERIFICATION
from coordinator.jobs.image import ImageJobs, Job, ResultRecord
from coordinator.workers import Worker

__all__ = [
    "ANONYMOUS",
    "ESCROW",
    "GRANTS",
    "VERIFICATION",
    "Account",
    "Job",
    "ResultRecord",
    "Store",
    "Worker",
    "hash_secret",
]


class Store(ImageJobs):
    pass
