"""Finding 3, self-verification: "a spot check excludes only the same worker, not the same
owner, and one trusted verifier's 'disagree' is final"; so one person's two workers vouch for
each other's fakes, and one malicious trusted worker pauses honest newcomers."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from client.api import AsyncTransport, Request, Response, StreamedResponse
from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.messages import LeasedJob
from protocol.params import ImageParams
from protocol.signing import Identity
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker, png, register_accounts
from worker.common.link import Capabilities, CoordinatorLink

# the job of the finding: 1024x1024, 20 steps, 40 kudos a round
BIG: dict[str, Any] = {"prompt": "a castle at dusk", "width": 1024, "height": 1024, "steps": 20}
BIG_CAPS = Capabilities(models=["tiny"], max_pixels=1024 * 1024, max_steps=50)
MEDIUM: dict[str, Any] = {"prompt": "a blue cone", "width": 256, "height": 256, "steps": 20}
FAKE_SEED = 999  # the colour of the fake both of Mallory's workers send


def _strict(config: CoordinatorConfig, **changes: object) -> CoordinatorConfig:
    """Every untrusted result is checked; fake workers answer at once, so no speed checks."""
    return dataclasses.replace(
        config,
        spot_check_rate=1.0,
        spot_check_min_rate=1.0,
        max_pixel_steps_per_second=float("inf"),
        new_account_grant=1000,
        **changes,  # type: ignore[arg-type]
    )


async def _fake_worker(url: str, name: str, api_key: str, identity: Identity) -> FakeWorker:
    """A FakeWorker holding `identity` (one the operator named in trusted_workers)."""
    worker = FakeWorker(url, name, api_key)
    await worker.link.aclose()
    worker.identity = identity
    worker.link = CoordinatorLink(url, identity, name, api_key)
    await worker.link.register()
    return worker


async def _serve(worker: FakeWorker, caps: Capabilities, seed_offset: int | None) -> LeasedJob:
    """Pop a job and answer it: the honest image (offset None) or a solid fake."""
    job = await worker.link.pop(caps, wait=5)
    assert job is not None
    params = job.params
    colours = [FAKE_SEED if seed_offset is not None else s for s in params.seeds()]
    await worker.link.submit(
        job, params.seeds(), [png(c, params.width, params.height) for c in colours]
    )
    return job


@pytest.fixture
async def mallorys_network(
    coordinator_config: CoordinatorConfig,
) -> AsyncIterator[tuple[LiveApp, Identity]]:
    """Mallory's veteran worker is trusted by the operator; an honest referee too."""
    veteran = Identity.generate()
    config = _strict(
        coordinator_config,
        trusted_workers=frozenset({veteran.public_key}),
        trusted_accounts=frozenset({"operator"}),
        trust_after_checks=3,
        verify_distinct_ip=False,  # everyone is on 127.0.0.1 here
    )
    runner, app = await start_app(config)
    try:
        yield app, veteran
    finally:
        await runner.cleanup()


async def test_a_persons_trusted_worker_never_checks_its_untrusted_sibling(
    mallorys_network: tuple[LiveApp, Identity],
) -> None:
    app, veteran_identity = mallorys_network
    mallory, operator, alice = await register_accounts(app.url, "mallory", "operator", "alice")
    veteran = await _fake_worker(app.url, "veteran", mallory, veteran_identity)
    async with (
        FakeWorker(app.url, "cheater", mallory) as cheater,
        FakeWorker(app.url, "referee", operator) as referee,
        AsyncClient(app.url, alice) as requester,
        AsyncClient(app.url, mallory) as owner,
    ):
        try:
            assert cheater.link.worker_id is not None and veteran.link.worker_id is not None
            assert (await requester.worker(veteran.link.worker_id)).trusted
            for round_ in range(3):
                created = await requester.submit_image(ImageParams(**BIG, seed=round_))
                served = await _serve(cheater, BIG_CAPS, seed_offset=FAKE_SEED)
                assert served.id == created.id
                # The attack: Mallory's trusted veteran asks for the check to "agree" with.
                assert await veteran.link.pop(BIG_CAPS, wait=0) is None, (
                    f"round {round_}: the spot check went to a worker of the same owner"
                )
                # An independent referee gets it and sees the fake for what it is.
                check = await referee.link.pop(BIG_CAPS, wait=5)
                assert check is not None and check.params == served.params
                await referee.link.submit(check, check.params.seeds(), [png(round_, 1024, 1024)])
            record = await requester.worker(cheater.link.worker_id)
            assert not record.trusted and record.checks_passed == 0
            # one referee's word is not final: the fakes' held pay waits for a second opinion
            # (nobody independent is left to give it), and the cheater is not paused yet
            assert (await owner.me()).pending == 3 * 20
            assert not record.paused
            assert await veteran.link.pop(BIG_CAPS, wait=0) is None
            assert await referee.link.pop(BIG_CAPS, wait=0) is None
        finally:
            await veteran.link.aclose()
    audit = await app.store.ledger.audit()
    assert audit["unbalanced_entries"] == 0 and audit["sum"] == 0


@pytest.fixture
async def eves_network(coordinator_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """Eve runs a trusted worker; one suspicion would pause anyone."""
    config = _strict(
        coordinator_config,
        trusted_accounts=frozenset({"operator", "eve"}),
        pause_after_suspicions=1,
        trust_after_checks=1,
        verify_distinct_ip=False,
    )
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


async def test_one_malicious_verifier_cannot_pause_an_honest_newcomer(
    eves_network: LiveApp,
) -> None:
    app = eves_network
    eve, operator, newbie_key, alice = await register_accounts(
        app.url, "eve", "operator", "newbie", "alice"
    )
    async with (
        FakeWorker(app.url, "eves", eve) as liar,
        FakeWorker(app.url, "referee", operator) as referee,
        FakeWorker(app.url, "newbie", newbie_key) as newbie,
        AsyncClient(app.url, alice) as requester,
        AsyncClient(app.url, newbie_key) as owner,
    ):
        assert newbie.link.worker_id is not None and liar.link.worker_id is not None
        created = await requester.submit_image(ImageParams(**MEDIUM, seed=5))
        await _serve(newbie, CAPS, seed_offset=None)
        assert (await owner.me()).pending == 1
        # Eve takes the check first and claims the honest image is wrong.
        check = await liar.link.pop(CAPS, wait=5)
        assert check is not None
        await liar.link.submit(check, [5], [png(FAKE_SEED, 256, 256)])
        record = await requester.worker(newbie.link.worker_id)
        assert not record.paused and record.suspicion == 0, record
        assert (await owner.me()).pending == 1  # held until decided
        assert await requester.image(created.id, 0) == png(5, 256, 256)
        # The second opinion goes to someone else than Eve.
        assert await liar.link.pop(CAPS, wait=0) is None
        second = await referee.link.pop(CAPS, wait=5)
        assert second is not None and second.params == check.params
        await referee.link.submit(second, [5], [png(5, 256, 256)])
        record = await requester.worker(newbie.link.worker_id)
        assert record.trusted and not record.paused and record.checks_passed == 1
        me = await owner.me()
        assert (me.pending, me.earned) == (0, 3)
        # the outvoted verifier takes the suspicion (and, at this setting, is paused)
        eves = await requester.worker(liar.link.worker_id)
        assert eves.suspicion == 1 and not eves.trusted and eves.paused
    audit = await app.store.ledger.audit()
    assert audit["unbalanced_entries"] == 0 and audit["sum"] == 0


class _ThroughProxy:
    """A transport whose requests arrive through the operator's proxy, which names
    `address` in X-Forwarded-For."""

    def __init__(self, inner: AsyncTransport, address: str) -> None:
        self.network = inner
        self._address = address

    def _forwarded(self, request: Request) -> Request:
        return dataclasses.replace(
            request, headers={**request.headers, "X-Forwarded-For": self._address}
        )

    async def send(self, request: Request) -> Response:
        return await self.network.send(self._forwarded(request))

    def stream(self, request: Request) -> AbstractAsyncContextManager[StreamedResponse]:
        return self.network.stream(self._forwarded(request))

    async def aclose(self) -> None:
        await self.network.aclose()


async def _behind_proxy(worker: FakeWorker, address: str) -> FakeWorker:
    """The worker's requests arrive through the operator's proxy, which names `address`."""
    network = worker.link.transport
    if isinstance(network, _ThroughProxy):  # moved house: the old proxy is gone
        network = network.network
    worker.link.transport = _ThroughProxy(network, address)
    await worker.link.register()
    return worker


async def _pop_all(workers: Sequence[FakeWorker]) -> list[LeasedJob | None]:
    return [await w.link.pop(CAPS, wait=0) for w in workers]


async def test_checks_avoid_the_checked_workers_address_behind_a_proxy(
    coordinator_config: CoordinatorConfig,
) -> None:
    config = _strict(
        coordinator_config,
        trusted_accounts=frozenset({"operator", "friend"}),
        trusted_proxies=("127.0.0.1/32",),
    )
    assert config.verify_distinct_ip  # the default
    runner, app = await start_app(config)
    try:
        mallory, friend, operator, alice = await register_accounts(
            app.url, "mallory", "friend", "operator", "alice"
        )
        async with (
            FakeWorker(app.url, "cheater", mallory) as cheater,
            FakeWorker(app.url, "same-house", friend) as neighbour,
            FakeWorker(app.url, "elsewhere", operator) as referee,
            AsyncClient(app.url, alice) as requester,
        ):
            await _behind_proxy(cheater, "203.0.113.7")
            await _behind_proxy(neighbour, "198.51.100.1, 203.0.113.7")  # spoofed first hop
            await _behind_proxy(referee, "198.51.100.20")
            await requester.submit_image(ImageParams(**MEDIUM, seed=1))
            served = await _serve(cheater, CAPS, seed_offset=FAKE_SEED)
            # another account, but the same address as the cheater: no check for it
            assert await neighbour.link.pop(CAPS, wait=0) is None
            check = await referee.link.pop(CAPS, wait=5)
            assert check is not None and check.params == served.params
            await referee.link.submit(check, [1], [png(1, 256, 256)])
            # the second opinion: not the first referee, not the cheater's address
            assert await _pop_all([neighbour, referee]) == [None, None]
            await _behind_proxy(neighbour, "192.0.2.55")  # moved house
            second = await neighbour.link.pop(CAPS, wait=5)
            assert second is not None and second.params == served.params
            await neighbour.link.submit(second, [1], [png(1, 256, 256)])
            assert cheater.link.worker_id is not None
            record = await requester.worker(cheater.link.worker_id)
            assert record.checks_failed == 1 and record.suspicion == 1
            assert await requester.image(served.id, 0) == png(1, 256, 256)
    finally:
        await runner.cleanup()
