"""The network at a glance, for the web page and anyone curious."""

from __future__ import annotations

from aiohttp import web

from coordinator.http.api import API, Call
from coordinator.http.state import STORE
from coordinator.jobs.network import network_status
from protocol.messages import NetworkStatus


@API.route(
    "GET",
    "/api/v1/network",
    summary="Workers seen today (online or not), the models online workers offer with "
    "their queues, and the queue of each kind",
    response=NetworkStatus,
)
async def network(request: web.Request, call: Call) -> NetworkStatus:
    return await network_status(request.app[STORE])
