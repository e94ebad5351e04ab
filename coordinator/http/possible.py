"""Whether an online worker could serve a queued image job, for the answers that say so:
AI Horde's `is_possible` and `NoAvailableWorker` warning (coordinator.http.horde), v1's
warning when a job is made (coordinator.http.jobs). The rules are coordinator.jobs.possible;
the workers' offers are read once per `network_view_seconds` for everyone
(coordinator.http.views)."""

from __future__ import annotations

from aiohttp import web

from coordinator.http.state import STORE, VIEWS
from coordinator.jobs.possible import unservable
from coordinator.store import ImageJob

__all__ = ["unservable_job"]


async def unservable_job(request: web.Request, job: ImageJob) -> str | None:
    """None when an online worker could serve `job` (or one holds it, or it is over);
    else why none can."""
    if job.finished or job.state == "leased":
        return None
    store = request.app[STORE]
    offers = await request.app[VIEWS].get("image_offers", store.network.image_offers)
    return unservable(offers, job.params, job.signed_only)
