"""Finding 11, text earnings never release: "only image spot checks release or forfeit held
pay", so an honest block server's or gateway's held pay stays held forever and a lying one
keeps its."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.messages import WorkerInfo
from protocol.signing import Identity
from protocol.text import ChatMessage, LeasedTextJob, TextModel, TextParams, TextResultAccepted
from tests.conftest import LiveApp, start_app
from worker.common.link import CoordinatorLink
from worker.errors import CoordinatorRejected
from worker.llm.swarm.peer_proof import PeerKey

# big enough that a server's share, and the half of it held, are whole kudos
MODEL = TextModel(name="tiny-llm", blocks=4, parameters=70_000_000_000, max_context=2048)
SERVED, CHECKER, SAME_OWNER_CHECKER, REFEREE = (PeerKey.generate() for _ in range(4))
# trusted gateways registered with bob's key (the checked server's owner) and mallory's
BOBS_GATEWAY, MALLORYS_TRUSTED = Identity.generate(), Identity.generate()
SPANS = [{"peer_id": SERVED.peer_id, "start": 0, "end": 4, "tokens": 149}]


@pytest.fixture
async def live(coordinator_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """The operator's and the auditor's gateways are trusted; every untrusted gateway's job
    is checked; two passes make a worker trusted, two failures pause it; everyone is on
    127.0.0.1."""
    config = dataclasses.replace(
        coordinator_config,
        text_models=(MODEL,),
        default_text_model=MODEL.name,
        trusted_accounts=frozenset({"operator", "auditor"}),
        trusted_workers=frozenset({BOBS_GATEWAY.public_key, MALLORYS_TRUSTED.public_key}),
        spot_check_rate=1.0,
        spot_check_min_rate=1.0,
        trust_after_checks=2,
        pause_after_suspicions=2,
        verify_distinct_ip=False,
    )
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


@pytest.fixture
async def grid(live: LiveApp) -> AsyncIterator[dict[str, Any]]:
    """bob's untrusted block server (SERVED and SAME_OWNER_CHECKER), carol's (CHECKER) and
    dave's (REFEREE); the operator's and the auditor's trusted gateways, mallory's untrusted
    one, bob's and mallory's trusted ones; alice asks."""
    names = ("alice", "operator", "auditor", "bob", "carol", "dave", "mallory")
    async with AsyncClient(live.url) as anon:
        keys = {name: (await anon.register(name)).api_key for name in names}
    links = {
        "gateway": CoordinatorLink(live.url, Identity.generate(), "gw", keys["operator"]),
        "untrusted": CoordinatorLink(live.url, Identity.generate(), "gw2", keys["mallory"]),
        "bobs_gateway": CoordinatorLink(live.url, BOBS_GATEWAY, "gw3", keys["bob"]),
        "auditor": CoordinatorLink(live.url, Identity.generate(), "gw4", keys["auditor"]),
        "mallorys_trusted": CoordinatorLink(live.url, MALLORYS_TRUSTED, "gw5", keys["mallory"]),
        "server": CoordinatorLink(live.url, Identity.generate(), "server", keys["bob"]),
        "checker": CoordinatorLink(live.url, Identity.generate(), "checker", keys["carol"]),
        "referee": CoordinatorLink(live.url, Identity.generate(), "referee", keys["dave"]),
    }
    for link in links.values():
        await link.register()
    await links["server"].link_peer(SERVED)
    await links["server"].link_peer(SAME_OWNER_CHECKER)
    await links["checker"].link_peer(CHECKER)
    await links["referee"].link_peer(REFEREE)
    alice = AsyncClient(live.url, keys["alice"])
    try:
        yield {"live": live, "alice": alice, **links}
    finally:
        for link in links.values():
            await link.aclose()
        await alice.aclose()


def check(verdict: str, *checkers: PeerKey, start: int = 1, end: int = 3) -> dict[str, Any]:
    """A gateway's spot check of SERVED on blocks [start, end)."""
    return {
        "peer_id": SERVED.peer_id,
        "start": start,
        "end": end,
        "checkers": [c.peer_id for c in checkers],
        "verdict": verdict,
    }


async def lease(grid: dict[str, Any], gateway: str) -> LeasedTextJob:
    """alice asks; `gateway` leases her job."""
    link: CoordinatorLink = grid[gateway]
    assert await link.pop_text([MODEL], wait=0) is None  # offers the model
    params = TextParams(messages=[ChatMessage(role="user", content="hi")], max_tokens=100)
    await grid["alice"].submit_text(params)
    job = await link.pop_text([MODEL], wait=5)
    assert job is not None
    return job


async def serve(
    grid: dict[str, Any], gateway: str, checks: list[dict[str, Any]]
) -> TextResultAccepted:
    """`gateway` runs a job of alice's on SERVED (all 4 blocks) and reports `checks`."""
    job = await lease(grid, gateway)
    link: CoordinatorLink = grid[gateway]
    return await link.submit_text(job, "Hello", "stop", 50, 100, SPANS, checks)


async def server(grid: dict[str, Any]) -> WorkerInfo:
    worker_id = grid["server"].worker_id
    assert worker_id is not None
    info: WorkerInfo = await grid["alice"].worker(worker_id)
    return info


async def money(grid: dict[str, Any]) -> tuple[int, int, int]:
    """(bob's balance, what bob's server has held, the grants account)."""
    balances = await grid["live"].store.ledger.balances()
    held = balances.get(f"pending:{grid['server'].worker_id}", 0)
    return balances["bob"], held, balances["system:grants"]


async def test_honest_work_checked_by_a_trusted_gateway_is_released(
    grid: dict[str, Any],
) -> None:
    await serve(grid, "gateway", [])
    bob, held, _ = await money(grid)
    assert held > 0  # untrusted: part of its pay waits for a check
    await serve(grid, "gateway", [check("agree", CHECKER)])
    after, still_held, _ = await money(grid)
    # both jobs' held pay reaches bob: 11 per job, 5 of it held until now
    assert still_held == 0 and after == bob + held + 11
    info = await server(grid)
    assert info.checks_passed == 1 and not info.trusted and info.suspicion == 0
    # a second pass without suspicion: trusted, and paid in full from now on
    await serve(grid, "gateway", [check("agree", CHECKER, REFEREE)])
    assert (await server(grid)).trusted
    before = (await money(grid))[0]
    await serve(grid, "gateway", [])
    assert (await money(grid))[:2] == (before + 11, 0)
    audit = await grid["live"].store.ledger.audit()
    assert audit["unbalanced_entries"] == 0 and audit["sum"] == 0
    # alice's grants paid every job: the servers' and gateways' pay, held or released, is
    # grants too (issue 26), so nothing anywhere became transferable
    assert (audit["transferable"], audit["minted"], audit["grants_off"]) == (0, 0, 0)


async def test_a_decided_wrong_forfeits_held_pay_and_pauses(grid: dict[str, Any]) -> None:
    await serve(grid, "gateway", [])
    bob, held, grants = await money(grid)
    # one disagreement the gateway could not decide changes nothing
    await serve(grid, "gateway", [check("undecided", CHECKER)])
    assert await money(grid) == (bob + 6, 2 * held, grants)
    assert (await server(grid)).suspicion == 0
    # the second server and a referee agreed against it: all held pay goes back to grants
    await serve(grid, "gateway", [check("wrong", CHECKER, REFEREE)])
    after, still_held, grants_after = await money(grid)
    assert still_held == 0 and after == bob + 2 * 6 and grants_after == grants + 3 * held
    info = await server(grid)
    assert info.suspicion == 1 and info.checks_failed == 1 and not info.paused
    # listing the same verdict many times counts once per job
    await serve(grid, "gateway", [check("wrong", CHECKER, REFEREE)] * 3)
    info = await server(grid)
    assert info.suspicion == 2 and info.paused and not info.trusted
    audit = await grid["live"].store.ledger.audit()
    assert audit["unbalanced_entries"] == 0 and audit["sum"] == 0


@pytest.mark.parametrize(
    ("gateway", "checks"),
    [
        # an untrusted gateway's word is worth nothing (mallory vouching for anyone)
        ("untrusted", [check("agree", CHECKER)] * 5),
        ("untrusted", [check("wrong", CHECKER, REFEREE)] * 5),
        # bob's own trusted gateway cannot vouch for bob's server
        ("bobs_gateway", [check("agree", CHECKER)] * 5),
        # nor can bob's other server check bob's server, even with a trusted gateway
        ("gateway", [check("agree", SAME_OWNER_CHECKER)] * 5),
        ("gateway", [check("wrong", CHECKER, SAME_OWNER_CHECKER)] * 5),
    ],
)
async def test_checks_that_are_not_independent_change_nothing(
    grid: dict[str, Any], gateway: str, checks: list[dict[str, Any]]
) -> None:
    await serve(grid, "gateway", [])
    bob, held, grants = await money(grid)
    await serve(grid, gateway, checks)
    info = await server(grid)
    assert (info.checks_passed, info.checks_failed, info.suspicion) == (0, 0, 0)
    assert (await money(grid))[1] == 2 * held and (await money(grid))[2] == grants


async def test_checks_that_the_job_could_not_have_made_are_refused(grid: dict[str, Any]) -> None:
    job = await lease(grid, "gateway")
    elsewhere = {**check("agree", REFEREE), "peer_id": CHECKER.peer_id}
    for bad, says in [
        (check("agree", CHECKER, start=2, end=9), r"checks\[0\]\.end"),
        (elsewhere, r"checks\[0\]\.peer_id"),
        (check("wrong", CHECKER), r"checks\[0\]\.checkers"),
    ]:
        with pytest.raises(CoordinatorRejected, match=says) as refused:
            await grid["gateway"].submit_text(job, "Hello", "stop", 50, 100, SPANS, [bad])
        assert refused.value.status == 400
    # nothing was settled: the job is still the gateway's to finish
    await grid["gateway"].submit_text(job, "Hello", "stop", 50, 100, SPANS, [])


# --- gateways checked by gateways --------------------------------------------------------


async def gateway_money(grid: dict[str, Any]) -> tuple[int, int, int, int]:
    """(alice's balance, mallory's, what mallory's untrusted gateway has held, grants)."""
    balances = await grid["live"].store.ledger.balances()
    held = balances.get(f"pending:{grid['untrusted'].worker_id}", 0)
    return balances["alice"], balances["mallory"], held, balances["system:grants"]


async def rerun(grid: dict[str, Any], gateway: str, text: str) -> None:
    """`gateway` takes the spot check of mallory's job and answers `text`."""
    check_job = await grid[gateway].pop_text([MODEL], wait=0)
    assert check_job is not None
    await grid[gateway].submit_text(check_job, text, "stop", 50, 100, SPANS, [])


async def test_an_untrusted_gateways_pay_is_released_by_an_independent_gateway(
    grid: dict[str, Any],
) -> None:
    original = await lease(grid, "untrusted")
    await grid["untrusted"].submit_text(original, "Hello", "stop", 50, 100, SPANS, [])
    alice, mallory, held, grants = await gateway_money(grid)
    assert held == 1  # 3 kudos for the gateway's head, 1 of them held
    # mallory's own trusted gateway is never given the check of mallory's gateway
    assert await grid["mallorys_trusted"].pop_text([MODEL], wait=0) is None
    check_job = await grid["gateway"].pop_text([MODEL], wait=0)
    assert check_job is not None and check_job.id != original.id
    # the same parameters, seed included
    assert (check_job.params, check_job.params_hash) == (original.params, original.params_hash)
    await grid["gateway"].submit_text(check_job, "Hello", "stop", 50, 100, SPANS, [])
    after = await gateway_money(grid)
    # released; alice paid nothing more; the check's 14 kudos of work came from grants
    assert after[:3] == (alice, mallory + held, 0) and after[3] == grants - 14
    assert (await grid["alice"].worker(grid["untrusted"].worker_id)).checks_passed == 1
    audit = await grid["live"].store.ledger.audit()
    assert audit["unbalanced_entries"] == 0 and audit["sum"] == 0


async def test_two_gateways_disagreeing_forfeit_the_pay_of_invented_text(
    grid: dict[str, Any],
) -> None:
    job = await lease(grid, "untrusted")
    await grid["untrusted"].submit_text(job, "invented", "stop", 50, 100, SPANS, [])
    _, mallory, held, grants = await gateway_money(grid)
    # one gateway's disagreement is not final: the pay stays held, nobody is suspected
    await rerun(grid, "gateway", "Hello")
    assert (await gateway_money(grid))[1:3] == (mallory, held)
    info = await grid["alice"].worker(grid["untrusted"].worker_id)
    assert info.suspicion == 0 and info.checks_failed == 0
    # the second check goes to someone else: not the first checker again
    assert await grid["gateway"].pop_text([MODEL], wait=0) is None
    await rerun(grid, "auditor", "Hello")
    after = await gateway_money(grid)
    assert after[1:3] == (mallory, 0) and after[3] == grants - 2 * 14 + held
    info = await grid["alice"].worker(grid["untrusted"].worker_id)
    assert info.suspicion == 1 and info.checks_failed == 1 and not info.trusted
    # the requester gets the checked text
    assert (await grid["alice"].text_job(job.id)).text == "Hello"
