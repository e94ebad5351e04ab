"""GET /metrics over real HTTP: database gauges, request and pop timings, lease expiries."""

from __future__ import annotations

import dataclasses

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.params import ImageParams
from tests.clock import MockClock, reaper_round
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker, register_accounts

PARAMS = ImageParams(prompt="a red cube", width=64, height=64, steps=4, seed=11)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def _scrape(url: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def _get(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        await resp.read()
        return resp.status


def _series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


def _zeros(**values: tuple[str, ...]) -> dict[frozenset[tuple[str, str]], float]:
    """Every combination of the label values, each 0."""
    combos: list[dict[str, str]] = [{}]
    for label, options in values.items():
        combos = [{**combo, label: option} for combo in combos for option in options]
    return {frozenset(combo.items()): 0.0 for combo in combos}


KINDS = ("image", "text")


async def test_an_empty_coordinator_exports_every_series_as_zero(live: LiveApp) -> None:
    """Absent is not zero to Prometheus (a rate over a missing series is no data): every
    gauge has each label value it can take from the first scrape on."""
    samples = await _scrape(live.url)
    states = ("queued", "leased", "done", "failed", "cancelled")
    assert _series(samples, "idlegrid_queue_length") == _zeros(kind=KINDS)
    assert _series(samples, "idlegrid_jobs") == _zeros(kind=KINDS, state=states)
    holders = ("user", "worker", "anonymous", "pending")
    assert _series(samples, "idlegrid_kudos_supply") == _zeros(holder=holders)
    workers = ("image", "text", "blocks", "unknown")
    assert _series(samples, "idlegrid_workers_online") == _zeros(
        kind=workers, trusted=("false", "true")
    )
    assert _value(samples, "idlegrid_sse_streams_open") == 0
    assert _series(samples, "idlegrid_lease_expiries_total") == _zeros(kind=KINDS)
    assert _series(samples, "idlegrid_pop_duration_seconds_count") == _zeros(kind=KINDS)


async def test_metrics_report_the_queue_requests_pops_kudos_and_workers(live: LiveApp) -> None:
    alice_key, bob_key = await register_accounts(live.url, "alice", "bob")
    async with AsyncClient(live.url, alice_key) as alice:
        job_ids = [(await alice.submit_image(PARAMS)).id for _ in range(3)]
    # never polled: known by their engine report (a block server), or not at all
    async with FakeWorker(live.url, "blocks") as blocks, FakeWorker(live.url, "silent"):
        await blocks.link.report_engine({"engine": "swarm-blocks", "sandboxed": True})
    async with FakeWorker(live.url, api_key=bob_key) as worker:
        await worker.link.report_engine({"engine": "diffusers", "sandboxed": True})
        leased = await worker.link.pop(CAPS, wait=0)
        assert leased is not None
        queued = next(job_id for job_id in job_ids if job_id != leased.id)
        async with aiohttp.ClientSession(headers={"apikey": alice_key}) as http:
            assert await _get(http, f"{live.url}/api/v1/jobs/{leased.id}") == 200
            assert await _get(http, f"{live.url}/api/v1/jobs/{queued}") == 200
            assert await _get(http, f"{live.url}/api/v1/jobs/no-such-job") == 404
            assert await _get(http, f"{live.url}/no/such/path") == 404
            before = await _scrape(live.url)
            # an event stream stays open while the scrape runs
            async with http.get(f"{live.url}/api/v1/jobs/{queued}/events") as stream:
                assert stream.status == 200
                await stream.content.readuntil(b"\n\n")
                samples = await _scrape(live.url)

    assert _value(samples, "idlegrid_queue_length", kind="image") == 2
    assert _value(samples, "idlegrid_queue_length", kind="text") == 0
    assert _value(samples, "idlegrid_jobs", kind="image", state="queued") == 2
    assert _value(samples, "idlegrid_jobs", kind="image", state="leased") == 1
    assert _value(samples, "idlegrid_jobs", kind="image", state="done") == 0
    assert _value(samples, "idlegrid_jobs", kind="text", state="queued") == 0

    job_route = {"method": "GET", "route": "/api/v1/jobs/{job_id}"}
    assert _value(samples, "idlegrid_http_request_duration_seconds_count", **job_route) == 3
    assert _value(samples, "idlegrid_http_requests_total", **job_route, status="200") == 2
    assert _value(samples, "idlegrid_http_requests_total", **job_route, status="404") == 1
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert _value(samples, "idlegrid_http_requests_total", **unmatched) == 1
    assert not any("no-such-job" in dict(labels).get("route", "") for _, labels in samples)
    pop_route = {"method": "POST", "route": "/api/v1/workers/pop", "status": "200"}
    assert _value(samples, "idlegrid_http_requests_total", **pop_route) == 1
    pops = _value(samples, "idlegrid_pop_duration_seconds_count", kind="image")
    assert pops is not None and pops >= 1

    assert _value(before, "idlegrid_sse_streams_open") == 0
    assert _value(samples, "idlegrid_sse_streams_open") == 1
    assert _value(samples, "idlegrid_workers_online", kind="image", trusted="false") == 1
    assert _value(samples, "idlegrid_workers_online", kind="blocks", trusted="false") == 1
    assert _value(samples, "idlegrid_workers_online", kind="unknown", trusted="false") == 1
    assert _value(samples, "idlegrid_workers_online", kind="text", trusted="false") == 0
    assert _value(samples, "idlegrid_workers_online", kind="image", trusted="true") == 0
    assert _value(samples, "idlegrid_lease_expiries_total", kind="image") == 0
    assert _value(samples, "idlegrid_lease_expiries_total", kind="text") == 0
    assert _value(samples, "idlegrid_pop_duration_seconds_count", kind="text") == 0

    async with AsyncClient(live.url, alice_key) as alice, AsyncClient(live.url, bob_key) as bob:
        held = (await alice.me()).kudos + (await bob.me()).kudos
    assert held < 200  # alice's three jobs are paid for (in escrow, not counted)
    assert _value(samples, "idlegrid_kudos_supply", holder="user") == held
    assert _value(samples, "idlegrid_kudos_supply", holder="pending") == 0
    supply = sum(v for (name, _), v in samples.items() if name == "idlegrid_kudos_supply")
    assert supply == held
    # the scrape before (this one is counted once it is answered)
    metrics_route = {"method": "GET", "route": "/metrics", "status": "200"}
    assert _value(samples, "idlegrid_http_requests_total", **metrics_route) == 1


async def test_an_expired_lease_is_counted(
    coordinator_config: CoordinatorConfig, clock: MockClock
) -> None:
    config = dataclasses.replace(coordinator_config, lease_timeout=60.0, reap_interval=1.0)
    runner, live = await start_app(config, clock)
    try:
        async with AsyncClient(live.url) as anonymous:
            await anonymous.submit_image(PARAMS)
        async with FakeWorker(live.url) as worker:
            assert await worker.link.pop(CAPS, wait=0) is not None
        await reaper_round(clock, 59.0)  # not yet
        samples = await _scrape(live.url)
        assert _value(samples, "idlegrid_lease_expiries_total", kind="image") == 0
        assert _value(samples, "idlegrid_jobs", kind="image", state="leased") == 1
        await reaper_round(clock, 2.0)
        samples = await _scrape(live.url)
        assert _value(samples, "idlegrid_lease_expiries_total", kind="image") == 1
        assert _value(samples, "idlegrid_jobs", kind="image", state="queued") == 1
        assert _value(samples, "idlegrid_jobs", kind="image", state="leased") == 0
    finally:
        await runner.cleanup()
