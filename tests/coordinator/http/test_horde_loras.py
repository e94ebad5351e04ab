"""AI Horde's image workers and jobs with LoRAs and textual inversions, over real HTTP: only
a worker popping with `allow_lora` gets them, in the shape AI Horde hands them out
(ModelPayloadLorasStable, ModelPayloadTextualInversionsStable); an image whose
`gen_metadata` says a LoRA or TI could not be used is neither delivered nor paid; a good
one is, with AI Horde's add-ons, and (unsigned, nothing pinned) is never spot-checked."""

from __future__ import annotations

from typing import Any

from client.api.worker_routes import Capabilities
from client.sdk import AsyncClient
from protocol.cost import image_cost
from tests.conftest import LiveApp
from tests.coordinator.http.test_horde import Horde, request, webp
from tests.coordinator.http.test_loras import CAPS, LORA, TI
from tests.fakes import FakeWorker, register_accounts

POP = {"name": "My Bridge", "models": ["tiny"], "max_pixels": 512 * 512}
LORAS = [LORA, {"name": "1234", "is_version": True}]
TIS = [TI, {"name": "x"}]


async def _faulted_run(live: LiveApp, key: str, name: str) -> int:
    account = await live.store.accounts.account_by_key(key)
    assert account is not None
    worker = await live.store.workers.horde_worker(account, name)
    assert worker is not None
    row = await live.store.workers.worker_row(worker.id)
    assert row is not None
    return int(row.faulted_run)


async def test_only_allow_lora_pops_them_in_ai_hordes_shape_and_a_good_image_is_paid(
    live: LiveApp,
) -> None:
    alice_key, owner_key = await register_accounts(live.url, "alice", "bridge")
    alice, bridge = Horde(live.url, alice_key), Horde(live.url, owner_key)
    wanted = await alice.ok("POST", "/v2/generate/async", request(loras=LORAS, tis=TIS), 202)
    plain = await alice.ok("POST", "/v2/generate/async", {**request(), "dry_run": True})
    # AI Horde's add-ons whoever serves it: 3 per LoRA, 1 for any TIs
    assert wanted["kudos"] == plain["kudos"] + 7
    # without allow_lora (AI Horde's default for reGen is off): nothing, and not possible
    assert (await bridge.ok("POST", "/v2/generate/pop", POP))["id"] is None
    check = await alice.ok("GET", f"/v2/generate/check/{wanted['id']}")
    assert check["is_possible"] is False and check["waiting"] == 1
    leased = await bridge.ok("POST", "/v2/generate/pop", {**POP, "allow_lora": True})
    assert leased["id"] == wanted["id"]
    payload = leased["payload"]
    assert payload["loras"] == [
        {
            "name": "Tiny Style",
            "model": 0.8,
            "clip": 0.5,
            "inject_trigger": "any",
            "is_version": False,
        },
        {"name": "1234", "model": 1.0, "clip": 1.0, "is_version": True},
    ]
    assert payload["tis"] == [
        {"name": "222", "inject_ti": "negprompt", "strength": 0.5},
        {"name": "x", "strength": 1.0},
    ]
    assert payload["prompt"] == "a red cube ### blurry"
    # notes that are not about a missing adapter are accepted (AI Horde adds types)
    notes = [
        {"type": "batch_index", "value": "see_ref", "ref": "0"},
        {"type": "source_image", "value": "see_ref"},
        {"type": "censorship", "value": "nsfw"},
    ]
    submit = {"id": wanted["id"], "seed": 11, "generation": webp((9, 9, 9)), "gen_metadata": notes}
    assert await bridge.ok("POST", "/v2/generate/submit", submit) == {"reward": wanted["kudos"]}
    status = await alice.ok("GET", f"/v2/generate/status/{wanted['id']}")
    assert status["done"] is True and len(status["generations"]) == 1
    assert status["kudos"] == wanted["kudos"]
    balances = await live.store.ledger.balances()
    assert balances["alice"] == 100 - int(wanted["kudos"])
    assert balances["bridge"] == 100  # held for dispute, as every AI Horde worker's pay
    async with AsyncClient(live.url, alice_key) as grid:
        job = await grid.job(wanted["id"])
    assert job.params is not None and image_cost(job.params) == wanted["kudos"]


async def test_an_image_missing_a_lora_is_not_delivered_nor_paid(live: LiveApp) -> None:
    alice_key, owner_key, other_key = await register_accounts(live.url, "alice", "bridge", "b2")
    alice = Horde(live.url, alice_key)
    bridges = [Horde(live.url, owner_key), Horde(live.url, owner_key), Horde(live.url, other_key)]
    wanted = await alice.ok("POST", "/v2/generate/async", request(loras=[LORA], tis=[TI]), 202)
    reserved = (await live.store.ledger.balances())["alice"]
    assert reserved == 100 - int(wanted["kudos"])
    # reGen renders without a LoRA it could not fetch, says so in gen_metadata, state ok
    failures = [("lora", "download_failed"), ("ti", "parse_failed"), ("lora", "baseline_mismatch")]
    for attempt, (bridge, (kind, value)) in enumerate(zip(bridges, failures, strict=True)):
        leased = await bridge.ok("POST", "/v2/generate/pop", {**POP, "allow_lora": True})
        assert leased["id"] == wanted["id"], attempt
        notes: list[dict[str, Any]] = [
            {"type": "censorship", "value": "nsfw"},
            {"type": kind, "value": value, "ref": "Tiny Style"},
        ]
        submit = {
            "id": wanted["id"],
            "seed": 11,
            "generation": webp((9, 9, 9)),
            "gen_metadata": notes,
        }
        assert await bridge.ok("POST", "/v2/generate/submit", submit) == {"reward": 0.0}
        check = await alice.ok("GET", f"/v2/generate/status/{wanted['id']}")
        assert check["generations"] == [] and check["finished"] == 0
        job = await live.store.image_jobs.get(wanted["id"])
        assert job is not None and job.error is not None and value in job.error
        if attempt < 2:
            # back in the queue, still reserved, nothing paid, not the worker's fault
            assert check["waiting"] == 1 and check["faulted"] is False
            balances = await live.store.ledger.balances()
            assert (balances["alice"], balances["bridge"]) == (reserved, 100)
    # the third give-back (two owners): failed with the reason, the requester refunded
    assert check["faulted"] is True and check["done"] is True
    failed = await live.store.image_jobs.get(wanted["id"])
    assert failed is not None and failed.state == "failed" and failed.error is not None
    assert failed.error.startswith("failed after 3 attempts; last: worker reported: ")
    assert "baseline_mismatch: " in failed.error and "'Tiny Style'" in failed.error
    balances = await live.store.ledger.balances()
    assert (balances["alice"], balances["bridge"], balances["b2"]) == (100, 100, 100)
    assert await live.store.image_jobs.results(wanted["id"]) == []
    assert await _faulted_run(live, owner_key, "My Bridge") == 0
    assert await _faulted_run(live, other_key, "My Bridge") == 0
    # a faulted report of a job without adapters still counts (--faulted-run)
    plain = await alice.ok("POST", "/v2/generate/async", request(), 202)
    await bridges[0].ok("POST", "/v2/generate/pop", {**POP, "allow_lora": True})
    faulted = {"id": plain["id"], "seed": 11, "state": "faulted", "generation": "Faulted"}
    notes = [{"type": "lora", "value": "download_failed"}]
    await bridges[0].ok("POST", "/v2/generate/submit", {**faulted, "gen_metadata": notes})
    assert await _faulted_run(live, owner_key, "My Bridge") == 1


async def test_an_ai_horde_workers_lora_job_is_never_spot_checked(
    checked_network: LiveApp,
) -> None:
    live = checked_network
    alice_key, owner_key, operator = await register_accounts(
        live.url, "alice", "bridge", "operator"
    )
    alice, bridge = Horde(live.url, alice_key), Horde(live.url, owner_key)
    caps = Capabilities(**CAPS, loras=True)
    async with FakeWorker(live.url, "referee", operator) as referee:
        # a trusted referee that takes LoRAs is around (spot_check_rate 1 here)
        assert await referee.link.pop(caps, wait=0) is None
        wanted = await alice.ok("POST", "/v2/generate/async", request(loras=[LORA]), 202)
        leased = await bridge.ok("POST", "/v2/generate/pop", {**POP, "allow_lora": True})
        assert leased["id"] == wanted["id"]
        submit = {"id": wanted["id"], "seed": 11, "generation": webp((9, 9, 9))}
        assert await bridge.ok("POST", "/v2/generate/submit", submit) == {"reward": wanted["kudos"]}
        # its result pins no CivitAI version: a re-run could not be compared, so none is
        # queued; the pay is held for dispute instead
        assert await referee.link.pop(caps, wait=0) is None
    job = await live.store.image_jobs.get(wanted["id"])
    assert job is not None and job.state == "done" and job.held_until is not None
