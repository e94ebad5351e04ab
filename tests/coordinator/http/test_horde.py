"""AI Horde's v2 API over real HTTP: an AI Horde client and an AI Horde worker against a
live coordinator, with one of our own workers beside them.

The expected shapes are written here from AI Horde's published API models
(Haidra-Org/AI-Horde horde/apis/models: RequestAsync, RequestStatusCheck,
RequestStatusStable/GenerationStable, UserDetails, WorkerDetails, ActiveModel,
GenerationPayloadStable, GenerationSubmitted, RequestError) and what horde_sdk requires of
them, not from our own models, so a drift on our side fails here.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import uuid
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from coordinator.http.state import CONFIG
from tests.clock import MockClock, reaper_round
from tests.conftest import LiveApp
from tests.fakes import CAPS, FakeWorker, png, register_accounts

# field -> type(s), as AI Horde's models declare them (kudos are Float there, ints are not)
CHECK = {
    "finished": int,
    "processing": int,
    "restarted": int,
    "waiting": int,
    "done": bool,
    "faulted": bool,
    "wait_time": int,
    "queue_position": int,
    "kudos": float,
    "is_possible": bool,
}
GENERATION = {
    "img": str,
    "seed": str,
    "id": str,
    "censored": bool,
    "worker_id": str,
    "worker_name": str,
    "model": str,
    "state": str,
}
USER = {
    "username": str,
    "id": int,
    "kudos": float,
    "kudos_details": dict,
    "worker_count": int,
    "worker_ids": list,
    "trusted": bool,
    "account_age": int,
    "records": dict,
}
WORKER = {
    "type": str,
    "name": str,
    "id": str,
    "online": bool,
    "requests_fulfilled": int,
    "kudos_rewards": float,
    "performance": str,
    "uptime": int,
    "maintenance_mode": bool,
    "bridge_agent": str,
    "trusted": bool,
    "models": list,
}
MODEL = {"name": str, "count": int, "performance": float, "queued": float, "eta": int, "type": str}
PAYLOAD = {
    "prompt": str,
    "sampler_name": str,
    "cfg_scale": float,
    "seed": str,
    "width": int,
    "height": int,
    "ddim_steps": int,
    "n_iter": int,
    "karras": bool,
}
ERROR = {"message": str, "rc": str}
KNOWN_SAMPLERS = {"k_lms", "k_heun", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"}
KNOWN_SAMPLERS |= {"k_dpm_fast", "k_dpm_adaptive", "k_dpmpp_2s_a", "k_dpmpp_2m", "dpmsolver"}
KNOWN_SAMPLERS |= {"k_dpmpp_sde", "k_dpmpp_2m_sde", "DDIM", "lcm"}


def shaped(body: Any, shape: dict[str, Any]) -> dict[str, Any]:
    """`body` has every field of `shape` with its AI Horde type (a bool is not an int)."""
    assert isinstance(body, dict), body
    for field, kind in shape.items():
        assert field in body, f"missing {field}: {body}"
        value = body[field]
        if kind is int:
            assert isinstance(value, int) and not isinstance(value, bool), (field, value)
        elif kind is float:
            assert isinstance(value, float), (field, value)
        else:
            assert isinstance(value, kind), (field, value)
    return body


class Horde:
    """An AI Horde client (or worker): plain HTTP with the `apikey` header."""

    def __init__(self, url: str, key: str = "0000000000") -> None:
        self.api = f"{url}/api"
        self.key = key

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"apikey": self.key, "Client-Agent": "idlegrid-tests:1:loopback"}
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.api + path, json=body, headers=headers) as resp,
        ):
            return resp.status, await resp.json()

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, answer = await self.call(method, path, body)
        assert got == status, (got, answer)
        return answer

    async def error(self, method: str, path: str, body: Any, status: int, rc: str) -> str:
        got, answer = await self.call(method, path, body)
        assert got == status, (got, answer)
        assert shaped(answer, ERROR)["rc"] == rc, answer
        return str(answer["message"])


def request(**params: Any) -> dict[str, Any]:
    base = {"width": 64, "height": 64, "steps": 4, "sampler_name": "k_euler_a", "seed": "11"}
    return {"prompt": "a red cube ### blurry", "params": {**base, **params}, "models": ["tiny"]}


def webp(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="WEBP", lossless=True)
    return base64.b64encode(out.getvalue()).decode()


async def test_an_ai_horde_client_gets_images_from_our_worker(live: LiveApp) -> None:
    alice_key, donor_key = await register_accounts(live.url, "alice", "donor")
    assert len(alice_key) == 22  # what AI Horde's clients accept
    alice = Horde(live.url, alice_key)
    # the model list and a worker appear once our worker polls
    async with FakeWorker(live.url, "ours", donor_key) as worker:
        assert await worker.link.pop(CAPS, wait=0) is None
        models = await alice.ok("GET", "/v2/status/models?type=image")
        assert [shaped(m, MODEL)["name"] for m in models] == ["tiny"] and models[0]["count"] == 1
        assert await alice.ok("GET", "/v2/status/models?type=text") == []
        created = await alice.ok(
            "POST",
            "/v2/generate/async",
            {**request(sampler_name="k_dpmpp_2m", karras=True, cfg_scale=6.5), "r2": False},
            202,
        )
        assert uuid.UUID(created["id"]) and isinstance(created["kudos"], float)
        check = shaped(await alice.ok("GET", f"/v2/generate/check/{created['id']}"), CHECK)
        assert check["waiting"] == 1 and check["done"] is False
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None and job.id == created["id"]
        p = job.params
        assert (p.prompt, p.negative_prompt, p.sampler, p.cfg_scale, p.seed) == (
            "a red cube",
            "blurry",
            "DPM++ 2M Karras",
            6.5,
            11,
        )
        # polling a live job never answers 4xx, with or without the key (the id is enough)
        anonymous = Horde(live.url)
        running = shaped(await anonymous.ok("GET", f"/v2/generate/check/{job.id}"), CHECK)
        assert running["processing"] == 1 and running["done"] is False
        image = png(11)
        await worker.link.submit(job, [11], [image])
    status = shaped(await alice.ok("GET", f"/v2/generate/status/{job.id}"), CHECK)
    assert status["done"] is True and status["finished"] == 1 and status["faulted"] is False
    (generation,) = status["generations"]
    shaped(generation, GENERATION)
    assert generation["seed"] == "11" and generation["model"] == "tiny"
    assert generation["worker_name"] == "ours" and generation["state"] == "ok"
    assert uuid.UUID(generation["id"])
    # r2 false: base64 WebP, pixel for pixel the PNG our worker uploaded
    decoded = Image.open(io.BytesIO(base64.b64decode(generation["img"])))
    assert decoded.format == "WEBP"
    original = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    assert np.array_equal(np.asarray(decoded.convert("RGB")), original)

    # r2 (the default): a download URL that needs no key, like AI Horde's
    async with FakeWorker(live.url, "ours", donor_key) as worker:
        created = await alice.ok("POST", "/v2/generate/async", request(seed="a phrase"), 202)
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None and job.params.seed is not None
        await worker.link.submit(job, [job.params.seed], [png(job.params.seed)])
    status = await alice.ok("GET", f"/v2/generate/status/{created['id']}")
    url = status["generations"][0]["img"]
    assert url.startswith(live.url)
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200 and await resp.read() == png(job.params.seed)
    async with aiohttp.ClientSession() as http, http.get(url[:-8] + "0" * 4 + ".png") as resp:
        assert resp.status == 404

    # the user, as AI Horde's clients look it up
    me = shaped(await alice.ok("GET", "/v2/find_user"), USER)
    assert me["username"] == f"alice#{me['id']}" and me["kudos"] == 100.0 - 2 * created["kudos"]
    assert shaped(await anonymous.ok("GET", f"/v2/users/{me['id']}"), USER)["id"] == me["id"]
    await anonymous.error("GET", "/v2/users/999999", None, 404, "UserNotFound")
    await anonymous.error("GET", "/v2/users/abc", None, 404, "UserNotFound")
    # the anonymous key is AI Horde's anonymous user; no key at all is a 401
    nobody = shaped(await anonymous.ok("GET", "/v2/find_user"), USER)
    assert (nobody["username"], nobody["id"], nobody["worker_count"]) == ("Anonymous#0", 0, 0)
    assert shaped(await anonymous.ok("GET", "/v2/users/0"), USER) == nobody
    await Horde(live.url, "").error("GET", "/v2/find_user", None, 401, "InvalidAPIKey")
    # workers
    listed = [shaped(w, WORKER) for w in await anonymous.ok("GET", "/v2/workers?type=image")]
    # (each `FakeWorker` is a new identity: two workers named "ours", one job each)
    assert [(w["name"], w["requests_fulfilled"]) for w in listed] == [("ours", 1)] * 2
    first = listed[0]
    assert first["type"] == "image" and first["models"] == ["tiny"]
    assert await anonymous.ok("GET", "/v2/workers?type=text") == []
    one = shaped(await anonymous.ok("GET", f"/v2/workers/{first['id']}"), WORKER)
    assert one["id"] == first["id"]
    await anonymous.error("GET", f"/v2/workers/{'0' * 32}", None, 404, "WorkerNotFound")
    beat = await anonymous.ok("GET", "/v2/status/heartbeat")
    assert beat["message"] == "OK" and isinstance(beat["version"], str)


async def test_errors_cancel_and_dry_run_speak_ai_horde(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "carol")
    carol, anonymous = Horde(live.url, key), Horde(live.url)
    await Horde(live.url, "x" * 22).error(
        "POST", "/v2/generate/async", request(), 401, "InvalidAPIKey"
    )
    message = await carol.error(
        "POST", "/v2/generate/async", request(sampler_name="k_dpm_fast"), 400, "UnsupportedSampler"
    )
    assert "k_euler_a" in message
    got, answer = await carol.call("POST", "/v2/generate/async", request(width=100))
    assert got == 400 and answer["rc"] == "BadRequest" and "params.width" in answer["errors"]
    assert "multiple of 8" in answer["errors"]["params.width"]
    got, answer = await carol.call("POST", "/v2/generate/async", {"params": {}})
    assert got == 400 and "prompt" in answer["errors"]
    # more than the account can pay: AI Horde's 403 KudosUpfront
    await carol.error(
        "POST",
        "/v2/generate/async",
        request(width=1024, height=1024, steps=150),
        403,
        "KudosUpfront",
    )
    await anonymous.error("GET", f"/v2/generate/check/{'ab' * 16}", None, 404, "RequestNotFound")
    dry = await carol.ok("POST", "/v2/generate/async", {**request(), "dry_run": True})
    assert set(dry) == {"kudos"} and dry["kudos"] > 0
    account = await live.store.accounts.account_by_key(key)
    assert account is not None
    assert await live.store.ledger.balance(account.id) == 100
    # cancel: done, not faulted, and the kudos back
    created = await carol.ok("POST", "/v2/generate/async", request(), 202)
    assert await live.store.ledger.balance(account.id) < 100
    cancelled = shaped(await carol.ok("DELETE", f"/v2/generate/status/{created['id']}"), CHECK)
    assert cancelled["done"] is True and cancelled["generations"] == []
    assert await live.store.ledger.balance(account.id) == 100
    # anonymous (AI Horde's ten zeros) may ask within the anonymous limits
    created = await anonymous.ok("POST", "/v2/generate/async", request(), 202)
    assert shaped(await anonymous.ok("GET", f"/v2/generate/check/{created['id']}"), CHECK)


async def test_an_ai_horde_worker_serves_our_queue_with_its_pay_held(
    clocked: LiveApp, clock: MockClock
) -> None:
    live = clocked
    alice_key, owner_key = await register_accounts(live.url, "alice", "bridge")
    alice, bridge = Horde(live.url, alice_key), Horde(live.url, owner_key)
    pop = {"name": "My Bridge", "models": ["tiny"], "max_pixels": 512 * 512, "amount": 1}
    await Horde(live.url).error("POST", "/v2/generate/pop", pop, 403, "AnonForbiddenWorker")
    empty = await bridge.ok("POST", "/v2/generate/pop", pop)
    assert empty["id"] is None and empty["ids"] == [] and "skipped" in empty
    # jobs it must not get: a requester wanting signed results, several images, PLMS
    await alice.ok("POST", "/v2/generate/async", {**request(), "trusted_workers": True}, 202)
    await alice.ok("POST", "/v2/generate/async", request(n=2), 202)
    async with aiohttp.ClientSession() as http:
        body = {"prompt": "x", "width": 64, "height": 64, "steps": 4, "sampler": "PLMS"}
        async with http.post(
            f"{live.url}/api/v1/jobs/image", json=body, headers={"apikey": alice_key}
        ) as resp:
            assert resp.status == 202
    assert (await bridge.ok("POST", "/v2/generate/pop", pop))["id"] is None
    wanted = await alice.ok("POST", "/v2/generate/async", request(), 202)
    leased = await bridge.ok("POST", "/v2/generate/pop", pop)
    assert leased["id"] == wanted["id"] and leased["ids"] == [wanted["id"]]
    assert leased["model"] == "tiny"
    payload = shaped(leased["payload"], PAYLOAD)
    assert payload["sampler_name"] in KNOWN_SAMPLERS
    assert payload["prompt"] == "a red cube ### blurry" and payload["seed"] == "11"
    assert (payload["width"], payload["height"], payload["ddim_steps"]) == (64, 64, 4)
    # a wrong image is refused and the job stays leased to it
    submit = {"id": leased["id"], "seed": 11, "state": "ok"}
    await bridge.error(
        "POST",
        "/v2/generate/submit",
        {**submit, "generation": webp((1, 2, 3), (128, 64))},
        400,
        "ImageValidationFailed",
    )
    await bridge.error(
        "POST", "/v2/generate/submit", {**submit, "generation": "R2"}, 400, "ImageValidationFailed"
    )
    (stranger_key,) = await register_accounts(live.url, "stranger")
    await Horde(live.url, stranger_key).error(
        "POST",
        "/v2/generate/submit",
        {**submit, "generation": webp((9, 9, 9))},
        403,
        "WrongCredentials",
    )
    reward = await bridge.ok(
        "POST", "/v2/generate/submit", {**submit, "generation": webp((9, 9, 9))}
    )
    assert reward == {"reward": wanted["kudos"]}
    await bridge.error(
        "POST",
        "/v2/generate/submit",
        {**submit, "generation": webp((9, 9, 9))},
        400,
        "DuplicateGen",
    )
    status = await alice.ok("GET", f"/v2/generate/status/{wanted['id']}")
    (generation,) = status["generations"]
    assert generation["worker_name"] == "My Bridge" and generation["seed"] == "11"
    async with aiohttp.ClientSession() as http, http.get(generation["img"]) as resp:
        stored = Image.open(io.BytesIO(await resp.read()))
        assert stored.format == "PNG" and stored.getpixel((5, 5)) == (9, 9, 9)
        assert "Sampler: Euler a" in stored.info["parameters"]
    # unsigned and never checked: held, and disputable by the requester through /api/v1
    store = live.store
    balances = await store.ledger.balances()
    assert balances["bridge"] == 100
    v1 = await _v1(live.url, f"/api/v1/jobs/{wanted['id']}", alice_key)
    assert v1["signed"] is False and v1["disputable"] is True
    await _v1(live.url, f"/api/v1/jobs/{wanted['id']}/dispute", alice_key, {"reason": "noise"})
    assert (await store.ledger.balances())["alice"] == balances["alice"] + int(wanted["kudos"])
    assert (await store.workers.worker_row(generation["worker_id"])).suspicion == 1  # type: ignore[union-attr]
    # a faulted report gives the next job back; an undisputed one is paid when the hold ends
    again = await alice.ok("POST", "/v2/generate/async", request(), 202)
    leased = await bridge.ok("POST", "/v2/generate/pop", pop)
    faulted = {"id": again["id"], "seed": 11, "state": "faulted", "generation": "Faulted"}
    assert await bridge.ok("POST", "/v2/generate/submit", faulted) == {"reward": 0.0}
    assert (await alice.ok("GET", f"/v2/generate/check/{again['id']}"))["waiting"] == 1
    leased = await bridge.ok("POST", "/v2/generate/pop", pop)
    await bridge.ok(
        "POST", "/v2/generate/submit", {**submit, "id": again["id"], "generation": webp((4, 4, 4))}
    )
    assert await store.image_jobs.release_held() == 0  # held for horde_hold_seconds
    hold = live.app[CONFIG].horde_hold_seconds
    await reaper_round(clock, hold - 1)
    assert (await store.ledger.balances())["bridge"] == 100
    await reaper_round(clock, 2)  # the hold has ended: the reaper pays
    assert (await store.ledger.balances())["bridge"] == 100 + int(again["kudos"])
    assert await store.image_jobs.release_held() == 0  # once
    audit = await store.ledger.audit()
    assert audit["unbalanced_entries"] == 0 and audit["sum"] == 0


async def _v1(url: str, path: str, key: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as http:
        method = "POST" if body is not None else "GET"
        async with http.request(method, url + path, json=body, headers={"apikey": key}) as resp:
            assert resp.status == 200, await resp.text()
            return json.loads(await resp.text())


async def test_images_are_decoded_under_the_upload_caps() -> None:
    from coordinator.errors import BadImage
    from coordinator.jobs.foreign_images import png_from_base64

    good = png_from_base64(webp((1, 2, 3)), 64, 64, "params")
    assert Image.open(io.BytesIO(good)).info["parameters"] == "params"
    assert png_from_base64(base64.b64encode(png(3)).decode(), 64, 64, "p").startswith(b"\x89PNG")
    # the size is read from the header before any pixel is decoded
    with pytest.raises(BadImage, match="1024x1024"):
        await asyncio.to_thread(png_from_base64, webp((0, 0, 0), (1024, 1024)), 64, 64, "p")
    with pytest.raises(BadImage, match="over the"):
        png_from_base64("A" * 10_000_000, 64, 64, "p")
    with pytest.raises(BadImage, match="neither WebP nor PNG"):
        png_from_base64(base64.b64encode(b"GIF89a" + b"\0" * 100).decode(), 64, 64, "p")
