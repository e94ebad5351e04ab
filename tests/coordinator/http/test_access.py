"""The access matrix: no key / wrong key / another user's key (and worker token) x every
route in `coordinator.http.api.API`, so a new endpoint is covered the day it is added.

Rules checked for every route:
- routes that need an API key or a worker token answer 401 without one or with a wrong one;
  optional-key routes answer 401 to a wrong key;
- nobody but the owner gets a 2xx for anything addressed by the victim's job id;
- no answer ever contains the victim's API key, worker token, image bytes or job ids, and
  no GET answer names the victim.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.http.api import API, Route
from protocol.params import ImageParams
from protocol.text import BUILTIN_DEFAULT_MODEL, BUILTIN_TEXT_MODELS, TextParams
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker, png

# import the app so every route module has registered its routes
from coordinator import app as _app  # noqa: F401  # isort: skip

ROUTES = sorted(API.routes, key=lambda r: (r.path, r.method))
SMALL: dict[str, Any] = {
    "prompt": "victim's secret prompt",
    "width": 64,
    "height": 64,
    "steps": 4,
    "seed": 3,
}
# the built-in tiny model of the operator's catalog (a worker cannot name its own)
MODEL = next(m for m in BUILTIN_TEXT_MODELS if m.name == BUILTIN_DEFAULT_MODEL)
TEXT = TextParams(prompt="victim's secret prompt", max_tokens=4)

# Valid bodies where an empty one would stop at validation before the access check.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/api/v1/jobs/image"): SMALL,
    ("POST", "/api/v1/quotes/image"): SMALL,
    ("POST", "/api/v1/jobs/{job_id}/progress"): {"image": 0, "step": 1, "steps": 4},
    ("POST", "/api/v1/jobs/{job_id}/fail"): {"reason": "stealing"},
    ("POST", "/api/v1/jobs/{job_id}/share"): {"shared": True},
    ("POST", "/api/v1/jobs/{job_id}/images/{index}/rating"): {"score": 1},
    ("POST", "/api/v1/transfers"): {"to": "mallory", "amount": 1},
    ("POST", "/api/v1/workers/pop"): {**CAPS.model_dump(), "wait": 0},
    ("POST", "/api/v1/workers/engine"): {"engine": "diffusers"},
    ("POST", "/api/v1/text/jobs"): TEXT.model_dump(exclude_none=True),
    ("POST", "/api/v1/text/pop"): {"models": [MODEL.model_dump()], "wait": 0},
    ("POST", "/api/v1/text/jobs/{job_id}/delta"): {"offset": 0, "text": "stolen"},
    ("POST", "/api/v1/text/jobs/{job_id}/fail"): {"reason": "stealing", "retry": False},
    ("POST", "/api/v1/text/jobs/{job_id}/result"): {
        "text": "stolen",
        "finish_reason": "stop",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "spans": [],
        "signature": "0" * 128,
    },
    # (a model nobody serves: a served one would wait for a gateway that never comes)
    ("POST", "/v1/chat/completions"): {
        "model": "not-served",
        "messages": [{"role": "user", "content": "hi"}],
    },
    ("POST", "/v1/completions"): {"model": "not-served", "prompt": "hi"},
    ("POST", "/api/v1/jobs/{job_id}/result"): {
        "images": [
            {
                "index": 0,
                "seed": 3,
                "sha256": "0" * 64,
                "signature": "0" * 128,
            }
        ]
    },
}


@dataclass
class World:
    app: LiveApp
    alice_key: str
    mallory_key: str
    victim_token: str
    thief_token: str
    done_job: str
    leased_job: str
    victim_worker: str
    victim_png: bytes
    text_done: str
    text_leased: str


@pytest.fixture
async def world(sqlite_only_config: CoordinatorConfig) -> AsyncIterator[World]:
    runner, app = await start_app(sqlite_only_config)
    async with AsyncClient(app.url) as anon:
        alice_key = (await anon.register("alice")).api_key
        mallory_key = (await anon.register("mallory")).api_key
    victim = FakeWorker(app.url, "victimw", alice_key)
    thief = FakeWorker(app.url, "thief", mallory_key)
    try:
        await victim.link.register()
        await thief.link.register()
        async with AsyncClient(app.url, alice_key) as alice:
            done = await alice.submit_image(ImageParams(**SMALL))
            job = await victim.link.pop(CAPS, wait=5)
            assert job is not None and job.id == done.id
            await victim.link.submit(job, [3], [png(3)])
            leased = await alice.submit_image(ImageParams(**{**SMALL, "seed": 4}))
            job = await victim.link.pop(CAPS, wait=5)
            assert job is not None and job.id == leased.id
            # and two text jobs: one finished, one leased to the victim (as a gateway)
            assert await victim.link.pop_text([MODEL], wait=0) is None
            text_done = await alice.submit_text(TEXT)
            text_job = await victim.link.pop_text([MODEL], wait=5)
            assert text_job is not None and text_job.id == text_done.id
            # (one sampled token: no block ran anything the report must account for)
            await victim.link.submit_text(text_job, "victim's secret reply", "stop", 0, 1, [])
            text_leased = await alice.submit_text(TEXT)
            text_job = await victim.link.pop_text([MODEL], wait=5)
            assert text_job is not None and text_job.id == text_leased.id
        assert victim.link.token and thief.link.token and victim.link.worker_id
        yield World(
            app,
            alice_key,
            mallory_key,
            victim.link.token,
            thief.link.token,
            done.id,
            leased.id,
            victim.link.worker_id,
            png(3),
            text_done.id,
            text_leased.id,
        )
    finally:
        await victim.link.aclose()
        await thief.link.aclose()
        await runner.cleanup()


def _path(route: Route, world: World) -> str:
    if route.path.startswith("/api/v1/text/jobs/"):
        job = world.text_leased if route.auth == "worker" else world.text_done
    else:
        job = world.leased_job if route.auth == "worker" else world.done_job
    values = {"job_id": job, "index": "0", "worker_id": world.victim_worker}
    path = route.path
    for part in path.split("/"):
        if part.startswith("{"):
            name = part[1:-1].split(":")[0]
            path = path.replace(part, values.get(name, "x"))
    return path


CALLERS = ("no key", "wrong key", "other user")


def _headers(caller: str, world: World) -> dict[str, str]:
    if caller == "no key":
        return {}
    if caller == "wrong key":
        return {"apikey": "wrong-key", "X-Worker-Token": "wrong-token", "Idempotency-Key": "k"}
    return {
        "apikey": world.mallory_key,
        "X-Worker-Token": world.thief_token,
        "Idempotency-Key": "k",
    }


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_access_matrix(world: World, route: Route) -> None:
    problems = []
    path = _path(route, world)
    # an error message may repeat the id the caller sent, but nothing else of the victim's
    jobs = (world.done_job, world.leased_job, world.text_done, world.text_leased)
    secrets = [world.alice_key, world.victim_token] + [job for job in jobs if job not in path]
    async with aiohttp.ClientSession() as http:
        for caller in CALLERS:
            body = BODIES.get((route.method, route.path), {})
            if route.path == "/api/v1/accounts":
                body = {"name": f"new-{CALLERS.index(caller)}"}
            async with http.request(
                route.method,
                world.app.url + path,
                data=json.dumps(body).encode() if route.method != "GET" else None,
                headers=_headers(caller, world),
                timeout=aiohttp.ClientTimeout(total=20),
            ) as resp:
                status, raw = resp.status, await resp.read()
            text = raw.decode(errors="replace")
            ok = 200 <= status < 300
            where = f"{caller}: HTTP {status}"
            if caller != "other user" and route.auth in ("user", "worker") and status != 401:
                problems.append(f"{where}, expected 401")
            if caller == "wrong key" and route.auth == "optional" and status != 401:
                problems.append(f"{where}, expected 401 for a wrong key")
            if "{job_id}" in route.path and ok:
                problems.append(f"{where}: reached the victim's job")
            for secret in secrets:
                if secret in text:
                    problems.append(f"{where}: the answer contains a secret of the victim")
            if world.victim_png in raw:
                problems.append(f"{where}: the answer contains the victim's image")
            public_record = "{worker_id}" in route.path
            if route.method == "GET" and ok and not public_record and "alice" in text:
                problems.append(f"{where}: the answer names the victim")
            if "secret prompt" in text or "secret reply" in text:
                problems.append(f"{where}: the answer shows the victim's prompt or text")
    assert not problems, problems
    # the victim's things are untouched
    async with AsyncClient(world.app.url, world.alice_key) as alice:
        assert (await alice.job(world.done_job)).state == "done"
        assert (await alice.job(world.leased_job)).state == "leased"
        assert await alice.image(world.done_job, 0) == world.victim_png
        assert (await alice.text_job(world.text_done)).text == "victim's secret reply"
        assert (await alice.text_job(world.text_leased)).state == "leased"
