"""The HTTP API in process: validation, auth, the worker protocol, OpenAPI, streams."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from client.errors import ApiError, AuthError, NotEnoughKudos
from client.sdk import AsyncClient
from protocol.messages import (
    IMAGE_SEED_HEADER,
    IMAGE_SHA256_HEADER,
    IMAGE_SIGNATURE_HEADER,
    JobStatus,
)
from protocol.params import ImageParams
from protocol.signing import Identity, account_binding, registration_message, sha256_hex
from tests.conftest import LiveApp
from tests.fakes import CAPS, FakeWorker, png
from worker.common.link import CoordinatorLink
from worker.errors import CoordinatorRejected, LeaseLost

GOOD: dict[str, Any] = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 4, "seed": 11}


async def _post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with http.post(url, data=data, headers=headers or {}) as resp:
            return resp.status, await resp.json()


async def _put(url: str, data: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.put(url, data=data, headers=headers) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    ("body", "field", "fix"),
    [
        ({**GOOD, "sampler": "Euler z"}, "sampler", "choose one of"),
        ({**GOOD, "width": 100}, "width", "multiple of 8; use 96 or 104"),
        ({**GOOD, "steps": 0}, "steps", "greater than or equal to 1"),
        ({**GOOD, "steps": 10_000}, "steps", "less than or equal to 150"),
        ({**GOOD, "prompt": "   "}, "prompt", "must contain some text"),
        ({**GOOD, "prompt": ""}, "prompt", "at least 1 character"),
        ({**GOOD, "n": -1}, "n", "greater than or equal to 1"),
        ({**GOOD, "steps": "20"}, "steps", "valid integer, got str"),
        ({**GOOD, "cfg_scale": "high"}, "cfg_scale", "got str"),
        ({**GOOD, "colour": "blue"}, "colour", "unknown field"),
        ({"width": 64}, "prompt", "is required"),
        ([1, 2], "body", "JSON object"),
    ],
)
async def test_bad_image_requests_name_the_field_and_store_nothing(
    live: LiveApp, body: Any, field: str, fix: str
) -> None:
    status, answer = await _post(f"{live.url}/api/v1/jobs/image", body)
    assert status == 400
    problems = {p["field"]: p["message"] for p in answer["error"]["fields"]}
    assert field in problems, answer
    assert fix in problems[field]
    assert await live.store.image_jobs.queue_position("any") is None
    assert (await live.store.ledger.audit())["entries"] == 0


async def test_malformed_and_oversized_bodies(live: LiveApp) -> None:
    status, answer = await _post(f"{live.url}/api/v1/jobs/image", b"{not json")
    assert status == 400 and answer["error"]["fields"][0]["field"] == "body"
    # each route has its own limit (coordinator.http.bodies); a registration is small
    status, answer = await _post(f"{live.url}/api/v1/accounts", {"name": "x" * 100_000})
    assert status == 413 and "limit" in answer["error"]["message"]


async def test_anonymous_limits_and_unknown_keys(live: LiveApp) -> None:
    status, answer = await _post(
        f"{live.url}/api/v1/jobs/image", {**GOOD, "width": 1024, "height": 1024}
    )
    assert status == 400 and answer["error"]["fields"][0]["field"] == "width"
    status, answer = await _post(f"{live.url}/api/v1/jobs/image", GOOD, {"apikey": "wrong"})
    assert status == 401


async def test_accounts_and_kudos(live: LiveApp) -> None:
    async with AsyncClient(live.url) as anon:
        created = await anon.register("alice")
        with pytest.raises(ApiError) as taken:
            await anon.register("alice")
        assert taken.value.status == 409
        with pytest.raises(ApiError) as bad:
            await anon.register("a b")
        assert bad.value.fields[0][0] == "name"
        with pytest.raises(AuthError):
            await anon.me()
    async with AsyncClient(live.url, created.api_key) as alice:
        assert (await alice.me()).kudos == 100
        with pytest.raises(NotEnoughKudos):
            await alice.submit_image(
                ImageParams(prompt="x", width=1024, height=1024, steps=150, n=10)
            )
        assert (await alice.me()).kudos == 100


async def _serve_one(worker: FakeWorker) -> str:
    job = await worker.link.pop(CAPS, wait=10)
    assert job is not None
    await worker.link.progress(job.id, 0, 1, job.params.steps)
    seeds = job.params.seeds()
    await worker.link.submit(job, seeds, [png(s) for s in seeds])
    return job.id


async def test_generate_through_a_worker_with_live_events(live: LiveApp, tmp_path: Any) -> None:
    async with AsyncClient(live.url) as grid:
        account = await grid.register("alice")
    seen: list[JobStatus] = []
    async with FakeWorker(live.url) as worker, AsyncClient(live.url, account.api_key) as alice:
        serving = asyncio.ensure_future(_serve_one(worker))
        result = await alice.generate(
            ImageParams(**{**GOOD, "n": 2}), tmp_path, on_progress=seen.append
        )
        assert await serving == result.job_id
        assert result.seeds == [11, 12]
        assert [p.read_bytes() for p in result.paths] == [png(11), png(12)]
        assert seen[-1].state == "done" and len(seen[-1].images) == 2
        assert (await alice.me()).kudos == 100 - result.kudos_cost
    balances = await live.store.ledger.balances()
    assert balances[f"worker:{worker.identity.public_key[:16]}"] == result.kudos_cost


async def test_worker_cannot_submit_for_a_job_not_leased_to_it(live: LiveApp) -> None:
    async with FakeWorker(live.url, "honest") as honest, FakeWorker(live.url, "thief") as thief:
        async with AsyncClient(live.url) as anon:
            created = await anon.submit_image(ImageParams(**GOOD))
        job = await honest.link.pop(CAPS, wait=5)
        assert job is not None and job.id == created.id
        with pytest.raises(LeaseLost):
            await thief.link.submit(job, [11], [png(11)])
        with pytest.raises(LeaseLost):
            await thief.link.progress(job.id, 0, 1, 4)
        # a signature by another key over the right bytes is refused too
        image = thief.link.signed_image(job, 0, 11, sha256_hex(png(11)))
        token = honest.link.token
        assert token is not None
        headers = {
            "X-Worker-Token": token,
            "Content-Type": "image/png",
            IMAGE_SEED_HEADER: "11",
            IMAGE_SHA256_HEADER: image["sha256"],
            IMAGE_SIGNATURE_HEADER: image["signature"],
        }
        upload = f"{live.url}/api/v1/jobs/{job.id}/images/0"
        status, answer = await _put(upload, png(11), headers)
        assert status == 401 and "signature" in answer["error"]["message"]
        # ... and so is the wrong seed for the image
        status, answer = await _put(upload, png(11), {**headers, IMAGE_SEED_HEADER: "12"})
        assert status == 400 and answer["error"]["fields"][0]["field"] == IMAGE_SEED_HEADER
        status, answer = await _post(
            f"{live.url}/api/v1/jobs/{job.id}/result",
            {"images": [{**image, "seed": 12}]},
            {"X-Worker-Token": token},
        )
        assert status == 400 and answer["error"]["fields"][0]["field"] == "images[0].seed"
        status, _ = await _post(
            f"{live.url}/api/v1/workers/pop", {**CAPS.model_dump()}, {"X-Worker-Token": "nope"}
        )
        assert status == 401
        await honest.link.submit(job, [11], [png(11)])
        with pytest.raises(LeaseLost):
            await honest.link.submit(job, [11], [png(11)])
    assert (await live.store.ledger.audit())["unbalanced_entries"] == 0


async def test_a_result_signature_is_checked_though_its_upload_verified(live: LiveApp) -> None:
    # the upload's verified signature is remembered: a different one in the result is not
    async with FakeWorker(live.url, "honest") as honest, FakeWorker(live.url, "other") as other:
        async with AsyncClient(live.url) as anon:
            await anon.submit_image(ImageParams(**GOOD))
        job = await honest.link.pop(CAPS, wait=5)
        assert job is not None and honest.link.token is not None
        await honest.link.upload_image(job, 0, 11, png(11))
        good = honest.link.signed_image(job, 0, 11, sha256_hex(png(11)))
        forged = {
            **good,
            "signature": other.link.signed_image(job, 0, 11, good["sha256"])["signature"],
        }
        result = f"{live.url}/api/v1/jobs/{job.id}/result"
        token = {"X-Worker-Token": honest.link.token}
        status, answer = await _post(result, {"images": [forged]}, token)
        assert status == 401 and answer["error"]["fields"][0]["field"] == "images[0].signature"
        status, answer = await _post(result, {"images": [good]}, token)
        assert status == 200, answer


async def test_failed_job_is_requeued_for_another_worker(live: LiveApp) -> None:
    async with (
        FakeWorker(live.url, "crashy") as crashy,
        FakeWorker(live.url, "steady") as steady,
        AsyncClient(live.url) as anon,
    ):
        created = await anon.submit_image(ImageParams(**GOOD))
        job = await crashy.link.pop(CAPS, wait=5)
        assert job is not None
        status = await crashy.link.fail(job.id, "EngineCrashed: killed")
        assert status.state == "queued" and status.attempts == 1
        assert await _serve_one(steady) == created.id
        final = await anon.job(created.id)
        assert final.state == "done"


async def _challenge(live: LiveApp, purpose: str) -> str:
    status, answer = await _post(f"{live.url}/api/v1/workers/challenge", {"purpose": purpose})
    assert status == 200, answer
    return str(answer["nonce"])


def _signed(identity: Identity, nonce: str, account: str = "") -> dict[str, Any]:
    message = registration_message("x1", identity.public_key, account, nonce)
    return {
        "name": "x1",
        "public_key": identity.public_key,
        "account": account,
        "nonce": nonce,
        "signature": identity.sign(message),
    }


async def test_registration_signs_a_fresh_challenge_and_the_account(live: LiveApp) -> None:
    identity, register = Identity.generate(), f"{live.url}/api/v1/workers/register"
    # a worker from before signed challenges is told what to do
    old = {"name": "x1", "public_key": identity.public_key, "timestamp": 0, "signature": "0" * 128}
    status, answer = await _post(register, old)
    assert status == 400 and answer["error"]["code"] == "outdated_worker"
    assert "upgrade idlegrid on the worker" in answer["error"]["message"]

    bad = {**_signed(identity, await _challenge(live, "register")), "signature": "0" * 128}
    status, answer = await _post(register, bad)
    assert status == 401 and "does not match public_key" in answer["error"]["message"]
    # a nonce handed out for a peer proof, or one the coordinator never issued
    for nonce in (await _challenge(live, "peer"), "0" * 32):
        status, answer = await _post(register, _signed(identity, nonce))
        assert status == 401 and answer["error"]["code"] == "challenge_rejected"

    async with AsyncClient(live.url) as anon:
        api_key = (await anon.register("owner")).api_key
    # signed without an account, sent with a key (and the other way round)
    status, answer = await _post(
        register, _signed(identity, await _challenge(live, "register")), {"apikey": api_key}
    )
    assert status == 401 and answer["error"]["fields"][0]["field"] == "account"
    signed = _signed(identity, await _challenge(live, "register"), account_binding(api_key))
    status, _ = await _post(register, signed)
    assert status == 401
    status, answer = await _post(register, signed, {"apikey": api_key})
    assert status == 200, answer
    row = await live.store.workers.worker_row(answer["worker_id"])
    owner = await live.store.accounts.account_by_key(api_key)
    assert row is not None and owner is not None and row.account_id == owner.id


async def test_a_worker_of_this_release_meets_an_older_coordinator(live: LiveApp) -> None:
    """An old coordinator has no challenge route: the worker says to upgrade it."""
    link = CoordinatorLink(f"{live.url}/old", Identity.generate(), "x1", None)
    try:
        with pytest.raises(CoordinatorRejected, match="upgrade the coordinator"):
            await link.register()
    finally:
        await link.aclose()


async def test_openapi_describes_the_routes_with_the_handlers_models(live: LiveApp) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{live.url}/api/v1/openapi.json") as resp:
        spec = await resp.json()
    assert spec["openapi"].startswith("3.1")
    submit = spec["paths"]["/api/v1/jobs/image"]["post"]
    ref = submit["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["properties"]["sampler"]["default"] == "Euler a"
    assert schema["additionalProperties"] is False
    assert "/api/v1/workers/pop" in spec["paths"]
    assert "/api/v1/jobs/{job_id}/events" in spec["paths"]
    # an image goes up as raw PNG bytes, its seed, hash and signature in headers
    upload = spec["paths"]["/api/v1/jobs/{job_id}/images/{index}"]["put"]
    assert upload["requestBody"]["content"]["image/png"]["schema"]["format"] == "binary"
    headers = {p["name"] for p in upload["parameters"] if p["in"] == "header"}
    assert headers == {IMAGE_SEED_HEADER, IMAGE_SHA256_HEADER, IMAGE_SIGNATURE_HEADER}
    assert {"400", "401", "409", "413"} <= set(upload["responses"])
    result = spec["paths"]["/api/v1/jobs/{job_id}/result"]["post"]["requestBody"]
    ref = result["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    item = spec["components"]["schemas"][ref]["properties"]["images"]["items"]["$ref"]
    submitted = spec["components"]["schemas"][item.rsplit("/", 1)[1]]
    assert "png_base64" not in submitted["properties"]


async def test_other_users_cannot_see_a_job(live: LiveApp) -> None:
    async with AsyncClient(live.url) as anon:
        alice = await anon.register("alice")
        bob = await anon.register("bob")
    async with AsyncClient(live.url, alice.api_key) as a, AsyncClient(live.url, bob.api_key) as b:
        created = await a.submit_image(ImageParams(**GOOD))
        assert (await a.job(created.id)).state == "queued"
        with pytest.raises(ApiError) as hidden:
            await b.job(created.id)
        assert hidden.value.status == 404
    async with AsyncClient(live.url) as anon:
        with pytest.raises(ApiError):
            await anon.job(created.id)
