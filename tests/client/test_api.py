"""The typed client (client.api): its I/O-free core, its faces, and the SDK and the worker's
link over the in-memory transport (tests/inmemory.py), which runs the coordinator's real
app in the test's process without sockets."""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client.api import ApiCore, Request, Response, TransportError, routes, worker_routes
from client.errors import (
    ApiError,
    AuthError,
    CoordinatorUnreachable,
    RateLimited,
)
from client.sdk import AsyncClient, Client, SdkErrors
from coordinator.config import CoordinatorConfig
from protocol.messages import JobStatus
from protocol.params import ImageParams
from protocol.signing import Identity
from protocol.text import BUILTIN_DEFAULT_MODEL, BUILTIN_TEXT_MODELS, TextParams
from tests.conftest import LiveApp
from tests.fakes import CAPS, FakeWorker, job_pngs
from tests.inmemory import InMemoryCoordinator
from worker.common.link import CoordinatorLink, WorkerErrors, retrying
from worker.errors import CoordinatorRejected, CoordinatorUnavailable, LeaseLost

SMALL = ImageParams(prompt="a red cube", width=64, height=64, steps=4, seed=7)


@pytest.fixture
async def coordinator(sqlite_only_config: CoordinatorConfig) -> AsyncIterator[InMemoryCoordinator]:
    async with InMemoryCoordinator(sqlite_only_config) as running:
        yield running


def _answer(status: int, text: str, **headers: str) -> Response:
    return Response(status, headers, text.encode())


# --- the core: no I/O -----------------------------------------------------------------


def test_the_core_adds_the_credential_each_route_asks_for() -> None:
    core = ApiCore("http://127.0.0.1:9/", "KEY", SdkErrors(), timeout=30.0)
    me = core.prepare(routes.me().request)
    assert me.url == "http://127.0.0.1:9/api/v1/accounts/me"
    assert me.headers == {"apikey": "KEY"} and me.timeout == 30.0
    pop = worker_routes.pop(CAPS, wait=5).request
    with pytest.raises(AssertionError, match="register"):
        core.prepare(pop)
    core.worker_token = "TOKEN"
    sent = core.prepare(pop)
    assert sent.headers == {"X-Worker-Token": "TOKEN"}  # never the account's key
    assert sent.timeout == 35.0  # a long-poll may take its wait and then some
    assert sent.json == {**CAPS.model_dump(exclude_none=True), "wait": 5}


def test_routes_build_bodies_from_the_request_models_and_keys_for_jobs() -> None:
    assert routes.register("alice").request.json == {"name": "alice"}
    assert routes.register("alice", "CODE").request.json == {"name": "alice", "invite": "CODE"}
    # the coordinator, not the client, judges the values (and names the field)
    assert routes.rate("job", 0, 11).request.json == {"score": 11}
    first, second = routes.submit_image(SMALL), routes.submit_image(SMALL)
    key = first.request.headers["Idempotency-Key"]
    assert key and key != second.request.headers["Idempotency-Key"]
    given = routes.transfer("bob", 5, idempotency_key="mine").request
    assert given.headers == {"Idempotency-Key": "mine"}
    assert given.json == {"to": "bob", "amount": 5}
    assert routes.history(10, before=3).request.params == {"limit": "10", "before": "3"}


def test_error_answers_become_each_faces_typed_errors() -> None:
    request = Request("GET", "/x", base_url="http://127.0.0.1:9")
    body = (
        '{"error": {"code": "bad", "message": "no", "fields": [{"field": "name", "message": "m"}]}}'
    )
    sdk = SdkErrors()
    refused = sdk.rejected(request, _answer(400, body))
    assert type(refused) is ApiError and refused.fields == [("name", "m")]
    assert isinstance(sdk.rejected(request, _answer(401, body)), AuthError)
    limited = sdk.rejected(request, _answer(429, body, **{"Retry-After": "7"}))
    assert isinstance(limited, RateLimited) and limited.retry_after == 7.0
    plain = sdk.rejected(request, _answer(502, ""))
    assert isinstance(plain, ApiError) and plain.message == "HTTP 502"
    worker = WorkerErrors()
    assert isinstance(worker.rejected(request, _answer(409, body)), LeaseLost)
    assert isinstance(worker.rejected(request, _answer(503, body)), CoordinatorUnavailable)
    rejected = worker.rejected(request, _answer(429, body))
    assert isinstance(rejected, CoordinatorRejected) and rejected.status == 429
    assert str(rejected) == "coordinator refused (HTTP 429): no"


# --- the faces ------------------------------------------------------------------------


def test_the_sync_client_has_every_call_of_the_async_one_with_its_signature() -> None:
    streams = {"events", "text_events", "aclose", "send", "exchange", "stream"}
    calls = [
        name
        for name, member in inspect.getmembers(AsyncClient)
        if not name.startswith("_")
        and name not in streams
        and (inspect.iscoroutinefunction(member) or hasattr(member, "route"))
    ]
    assert {"me", "generate", "complete", "submit_image", "register", "cancel_text"} <= set(calls)
    with Client("http://127.0.0.1:9") as sync:
        grid = sync._async
        for name in calls:
            assert inspect.signature(getattr(sync, name)) == inspect.signature(
                getattr(grid, name)
            ), name


async def test_the_sync_client_calls_a_live_coordinator(live: LiveApp) -> None:
    def use() -> tuple[str, int]:
        with Client(live.url) as anon:
            key = anon.register("sync-alice").api_key
        with Client(live.url, key) as alice:
            quote = alice.quote_image(SMALL)
            return alice.me().name, quote.kudos_cost

    name, cost = await asyncio.to_thread(use)
    assert name == "sync-alice" and cost > 0


async def test_no_coordinator_is_unreachable_in_each_faces_words() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    # (closed: connections to it are refused)
    async with AsyncClient(url, wait_timeout=0.5) as grid:
        with pytest.raises(CoordinatorUnreachable, match="cannot reach the coordinator") as info:
            await grid.me()
        assert isinstance(info.value.__cause__, TransportError) and not info.value.__cause__.sent
        # nothing was sent: a submit is not retried
        with pytest.raises(CoordinatorUnreachable):
            await grid.submit_image(SMALL)
    link = CoordinatorLink(url, Identity.generate(), "nowhere", None)
    try:
        with pytest.raises(CoordinatorUnavailable, match="cannot reach the coordinator"):
            await link.register()
        with pytest.raises(TimeoutError):
            # the worker keeps retrying while the coordinator is away
            await asyncio.wait_for(retrying("register", link.register), 0.5)
    finally:
        await link.aclose()


# --- the SDK and the link over the in-memory transport ----------------------------------


async def test_an_image_job_end_to_end_in_memory(
    coordinator: InMemoryCoordinator, tmp_path: Path
) -> None:
    url = coordinator.url
    async with AsyncClient(url, transport=coordinator.transport()) as anon:
        key = (await anon.register("alice")).api_key
    seen: list[JobStatus] = []
    async with (
        AsyncClient(url, key, transport=coordinator.transport()) as alice,
        FakeWorker(url, transport=coordinator.transport()) as worker,
    ):
        warned: list[str] = []
        making = asyncio.create_task(
            alice.generate(SMALL, tmp_path, on_progress=seen.append, on_warning=warned.append)
        )
        # made before any worker offered anything: the coordinator says so, and it waits
        for _ in range(500):
            if warned:
                break
            await asyncio.sleep(0.01)
        assert warned == ["no image worker is online; the job waits until one can"]
        job = await worker.link.pop(CAPS, wait=10)
        assert job is not None and job.params.prompt == SMALL.prompt
        await worker.link.progress(job.id, 0, 2, 4)
        pngs = job_pngs(job)
        accepted = await worker.link.submit(job, job.params.seeds(), pngs)
        result = await making
        assert result.job_id == job.id == accepted.id and result.images == pngs
        assert [path.read_bytes() for path in result.paths] == pngs
        assert result.warnings == warned
        # the statuses came through the job's event stream as they happened
        states = [(status.state, status.step) for status in seen]
        assert ("leased", 2) in states and states[-1][0] == "done"
        assert (await alice.me()).spent == result.kudos_cost
        assert (await coordinator.store.ledger.balances())["alice"] == 100 - result.kudos_cost


async def test_a_text_job_streams_in_memory(coordinator: InMemoryCoordinator) -> None:
    model = next(m for m in BUILTIN_TEXT_MODELS if m.name == BUILTIN_DEFAULT_MODEL)
    url = coordinator.url
    async with AsyncClient(url, transport=coordinator.transport()) as anon:
        key = (await anon.register("alice")).api_key
    gateway = FakeWorker(url, "gateway", transport=coordinator.transport())
    async with gateway, AsyncClient(url, key, transport=coordinator.transport()) as alice:
        assert await gateway.link.pop_text([model], wait=0) is None  # offers the model
        assert model.name in await alice.models()
        pieces: list[str] = []
        asking = asyncio.create_task(
            alice.complete(TextParams(prompt="Hi", max_tokens=3), on_text=pieces.append)
        )
        job = await gateway.link.pop_text([model], wait=10)
        assert job is not None
        await gateway.link.text_delta(job.id, 0, "Hello")
        await gateway.link.submit_text(job, "Hello, world", "length", 0, 1, [])
        status = await asking
        assert status.text == "Hello, world" and "".join(pieces) == "Hello, world"


async def test_refusals_are_typed_in_memory(coordinator: InMemoryCoordinator) -> None:
    url = coordinator.url
    async with AsyncClient(url, transport=coordinator.transport()) as anon:
        with pytest.raises(ApiError) as bad_name:
            await anon.register("a b")
        assert bad_name.value.status == 400 and [f for f, _ in bad_name.value.fields] == ["name"]
        key = (await anon.register("alice")).api_key
    async with AsyncClient(url, "not-a-key", transport=coordinator.transport()) as stranger:
        with pytest.raises(AuthError):
            await stranger.me()
    async with (
        AsyncClient(url, key, transport=coordinator.transport()) as alice,
        FakeWorker(url, "honest", transport=coordinator.transport()) as honest,
        FakeWorker(url, "thief", transport=coordinator.transport()) as thief,
    ):
        created = await alice.submit_image(SMALL)
        job = await honest.link.pop(CAPS, wait=5)
        assert job is not None and job.id == created.id
        with pytest.raises(LeaseLost):
            await thief.link.progress(job.id, 0, 1, 4)
        with pytest.raises(CoordinatorRejected) as unknown:
            await thief.link.fail("no-such-job", "x")
        assert 400 <= unknown.value.status < 500
