"""The network at a glance, for the web page and anyone curious.

Anyone may ask, so the view is bounded (README "Request bodies and views"): workers come a
page at a time (`?offset=`, `?limit=` up to PAGE_MAX), the models are the MODELS_LISTED
most offered or most wanted, the whole view is computed at most once per
`network_view_seconds` for everyone (coordinator.http.views), and asking is rate-limited
(`network` scope).
"""

from __future__ import annotations

from typing import Annotated

from aiohttp import web

from coordinator.http.api import API, Call
from coordinator.http.params import WholeNumber
from coordinator.http.state import STORE, VIEWS
from protocol.messages import NetworkStatus

__all__ = ["MODELS_LISTED", "PAGE_MAX", "shared_network_status"]

PAGE_DEFAULT = 50
PAGE_MAX = 100
MAX_OFFSET = 1_000_000
# a model list longer than this is someone's spam, not a choice anybody reads
MODELS_LISTED = 200


async def shared_network_status(request: web.Request, *, online_only: bool) -> NetworkStatus:
    """The network's view (coordinator.jobs.network.Network.status), models capped at
    MODELS_LISTED, shared by every request within `network_view_seconds`."""

    async def compute() -> NetworkStatus:
        store = request.app[STORE]
        return await store.network.status(online_only=online_only, max_models=MODELS_LISTED)

    return await request.app[VIEWS].get(f"network:{online_only}", compute)


@API.route(
    "GET",
    "/api/v1/network",
    summary="Workers seen today (online or not; a page of them, newest first: ?offset=, "
    f"?limit= up to {PAGE_MAX}), the models online workers offer with their queues (the "
    f"{MODELS_LISTED} most offered), and the queue of each kind",
    response=NetworkStatus,
    limit="network",
)
async def network(
    request: web.Request,
    call: Call[None],
    offset: Annotated[
        int, WholeNumber("workers to skip (next_offset of the page before)", 0, MAX_OFFSET)
    ] = 0,
    limit: Annotated[
        int, WholeNumber(f"workers to return (default {PAGE_DEFAULT})", 1, PAGE_MAX)
    ] = PAGE_DEFAULT,
) -> NetworkStatus:
    view = await shared_network_status(request, online_only=False)
    page = view.workers[offset : offset + limit]
    more = offset + limit < len(view.workers)
    return view.model_copy(
        update={"workers": page, "next_offset": offset + limit if more else None}
    )
