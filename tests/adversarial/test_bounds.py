"""Issue 26, "every input bounded, never a 500": findings 4, 5, 6, 7 and 9, each played by
an outsider with only HTTP against a real coordinator on 127.0.0.1.

One test per finding; each failed on the code before the fix.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from PIL import Image

from coordinator.config import DEFAULT_RATE_LIMITS, CoordinatorConfig, RateLimit
from protocol.signing import Identity
from protocol.text import TextModel
from tests.conftest import LiveApp, start_app
from tests.fakes import register_accounts
from worker.common.link import Capabilities, CoordinatorLink
from worker.errors import CoordinatorRejected

ANONYMOUS = "0000000000"
# the sizes `idlegrid models tiny` builds into DIR/llm (the coordinator's built-in entry)
LLM = TextModel(name="llm", blocks=4, parameters=276_032, max_context=512)


@asynccontextmanager
async def coordinator(tmp_path: Path, **options: Any) -> AsyncIterator[LiveApp]:
    config = CoordinatorConfig(data_dir=tmp_path / "data", port=0, **options)
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    key: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    headers = {"apikey": key} if key else {}
    if body is not None:
        raw = json.dumps(body).encode()
    if raw is not None:
        headers["Content-Type"] = "application/json"
    # a file-like body: aiohttp warns about large bytes sent at once
    data = None if raw is None else io.BytesIO(raw)
    async with http.request(method, url, data=data, headers=headers) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text else None


def fields(answer: Any) -> str:
    """The field names of an error, v1 (`error.fields`) or AI Horde's (`errors`) shape."""
    if "error" in answer:
        return " ".join(f["field"] for f in answer["error"]["fields"])
    message: str = answer["message"]
    return " ".join((answer.get("errors") or {}).keys()) + " " + message


async def test_worker_model_lists_are_bounded_and_the_network_view_is_paged(
    tmp_path: Path,
) -> None:
    """Finding 4 (amplification): "240 AI Horde workers each sending a models list of about
    63 KB make the anonymous, unlimited GET /api/v1/network 14 MB".

    Model lists are capped in count and name length (400 naming `models`, for AI Horde's
    and our own workers); the view is paged, shared by everyone asking within
    `network_view_seconds`, and rate-limited."""
    limits = {**DEFAULT_RATE_LIMITS, "network": RateLimit(0.01, 10, 0.01, 10)}
    async with (
        coordinator(tmp_path, network_view_seconds=600.0, rate_limits=limits) as live,
        aiohttp.ClientSession() as http,
    ):
        keys = await register_accounts(live.url, "mallory", "mallory2", "mallory3", "mallory4")
        pop = f"{live.url}/api/v2/generate/pop"
        # the finding's list: about 63 KB of model names
        spam = [f"model-{i:04d}-{'x' * 50}" for i in range(1000)]
        status, answer = await call(http, "POST", pop, {"name": "w0", "models": spam}, keys[0])
        assert status == 400 and "models" in fields(answer), answer
        long_name = ["m" * 101]
        status, answer = await call(http, "POST", pop, {"name": "w0", "models": long_name}, keys[0])
        assert status == 400 and "models" in fields(answer), answer
        # our own workers' pop has the same bound on names
        link = CoordinatorLink(live.url, Identity.generate(), "native", keys[0])
        try:
            await link.register()
            wants = Capabilities(models=long_name, max_pixels=4096, max_steps=4)
            with pytest.raises(CoordinatorRejected, match="models") as refused:
                await link.pop(wants, wait=0)
            assert refused.value.status == 400
        finally:
            await link.aclose()

        # the most a worker may offer (256 names of 100 characters), from 60 names (20 on
        # each of three accounts: --max-workers-per-account; the first holds "native")
        for n in range(60):
            names = [f"w{n:02d}-{i:03d}-{'y' * 92}" for i in range(256)]
            body = {"name": f"w{n}", "models": names}
            status, answer = await call(http, "POST", pop, body, keys[1 + n % 3])
            assert status == 200, answer
        url = f"{live.url}/api/v1/network"
        async with http.get(url) as resp:
            assert resp.status == 200
            first = await resp.read()
        view = json.loads(first)
        assert len(view["workers"]) == 50 and view["next_offset"] == 50
        assert len(view["models"]) == 200
        assert len(first) < 2_000_000
        status, rest = await call(http, "GET", f"{url}?offset=50&limit=100")
        assert status == 200 and len(rest["workers"]) == 10 and rest["next_offset"] is None
        status, answer = await call(http, "GET", f"{url}?limit=100000")
        assert status == 400 and "limit" in fields(answer)

        # shared: a new worker shows up only when the view is computed again
        status, _ = await call(http, "POST", pop, {"name": "late", "models": ["a"]}, keys[0])
        assert status == 200
        async with http.get(url) as resp:
            assert await resp.read() == first

        # and rate-limited per address (10 at once here)
        statuses = [(await call(http, "GET", f"{live.url}/api/v2/workers"))[0] for _ in range(10)]
        assert 429 in statuses


async def test_tiny_anonymous_inputs_get_a_400_naming_the_field(tmp_path: Path) -> None:
    """Finding 5: "A v2 seed of "²" (passes isdigit, fails int), a 5 000-digit seed, and a
    JSON body nested 30 000 deep on any body route" each answered 500 with a traceback.

    Any seed text is taken as AI Horde takes it (numbers as they are, other text hashed);
    numbers out of range are a 400 naming the field; a body nested deeper than 64 levels,
    holding NaN, or a lone surrogate is a 400 naming the body."""
    async with coordinator(tmp_path) as live, aiohttp.ClientSession() as http:
        v2 = f"{live.url}/api/v2/generate/async"
        base: dict[str, Any] = {
            "prompt": "a cube",
            "params": {"width": 64, "height": 64, "steps": 4},
        }
        for seed in ("²", "1" * 5000, "٣", "12abc", 2**40, "4294967295"):
            body = {**base, "params": {**base["params"], "seed": seed}}
            status, answer = await call(http, "POST", v2, body, ANONYMOUS)
            assert status == 202, (seed, answer)
        v1 = f"{live.url}/api/v1/jobs/image"
        image = {"prompt": "a cube", "width": 64, "height": 64, "steps": 4}
        status, answer = await call(http, "POST", v1, {**image, "seed": 10**30})
        assert status == 400 and fields(answer) == "seed", answer
        long_number = b'{"prompt": "x", "seed": 1' + b"0" * 4999 + b"}"
        status, answer = await call(http, "POST", v1, raw=long_number)
        assert status == 400 and fields(answer) == "body", answer
        status, answer = await call(http, "POST", v1, raw=b'{"prompt": "x", "cfg_scale": NaN}')
        assert status == 400 and fields(answer) == "body", answer
        status, answer = await call(http, "POST", v1, raw=b'{"prompt": "\\ud800 x"}')
        assert status == 400 and fields(answer) == "body", answer

        # whole numbers in the query and the path too
        (key,) = await register_accounts(live.url, "rater")
        for bad in ("²", "1" * 5000, "-1", "x"):
            status, answer = await call(http, "GET", f"{live.url}/api/v1/network?limit={bad}")
            assert status == 400 and fields(answer) == "limit", answer
            rating = f"{live.url}/api/v1/jobs/{'0' * 32}/images/{bad}/rating"
            status, answer = await call(http, "POST", rating, {"score": 5}, key)
            assert status == 400 and fields(answer) == "index", answer

        deep = b"[" * 30_000 + b"]" * 30_000
        inside = b'{"prompt": "x", "params": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
        for path in (
            "/api/v1/accounts",
            "/api/v1/jobs/image",
            "/api/v1/text/jobs",
            "/api/v2/generate/async",
            "/api/v2/generate/submit",
            "/v1/chat/completions",
        ):
            for nested_body in (deep, inside):
                status, answer = await call(http, "POST", live.url + path, raw=nested_body)
                assert status == 400, (path, answer)
                assert "body" in fields(answer) and "64 levels" in json.dumps(answer), answer
        # 64 levels are fine (an ignored option of an AI Horde request)
        nested: Any = 1
        for _ in range(62):
            nested = {"a": nested}
        status, answer = await call(http, "POST", v2, {**base, "extra": nested}, ANONYMOUS)
        assert status == 202, answer


def noise_webp(side: int, *, lossless: bool, seed: int) -> str:
    """A WebP of random pixels (nothing to compress), base64: an honest worst case."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    out = io.BytesIO()
    image.save(out, format="WEBP", quality=95, lossless=lossless)
    return base64.b64encode(out.getvalue()).decode()


async def test_an_ai_horde_worker_submits_real_images(tmp_path: Path) -> None:
    """Finding 6: "/api/v2/generate/submit has the 64 KiB JSON cap, so an honest 512x512
    WebP (about 290 KB of base64) gets 413".

    Each route has its own body limit (coordinator.http.bodies); the v2 submit takes an
    image of the largest job, base64 counted. A worker speaking AI Horde's protocol over
    HTTP submits a noisy 512x512 (lossy) and a noisy 1024x1024 (lossless, about 4 MB)."""
    seed = secrets.randbelow(2**32)
    print(f"noise seed {seed}")
    async with coordinator(tmp_path) as live, aiohttp.ClientSession() as http:
        alice, bridge = await register_accounts(live.url, "alice", "bridge")
        pop = {"name": "honest", "models": ["tiny"], "max_pixels": 1024 * 1024}
        for side, lossless in ((512, False), (1024, True)):
            request = {
                "prompt": "static",
                "params": {"width": side, "height": side, "steps": 4, "seed": "7"},
                "models": ["tiny"],
            }
            status, created = await call(
                http, "POST", f"{live.url}/api/v2/generate/async", request, alice
            )
            assert status == 202, created
            pop_url = f"{live.url}/api/v2/generate/pop"
            status, leased = await call(http, "POST", pop_url, pop, bridge)
            assert status == 200 and leased["id"] == created["id"], leased
            image = noise_webp(side, lossless=lossless, seed=seed)
            assert len(image) > 4 * 64 * 1024  # well past the old cap
            submit = {"id": leased["id"], "generation": image, "seed": 7, "state": "ok"}
            status, answer = await call(
                http, "POST", f"{live.url}/api/v2/generate/submit", submit, bridge
            )
            assert status == 200 and "reward" in answer, (side, answer)
            status, done = await call(
                http, "GET", f"{live.url}/api/v2/generate/status/{created['id']}", key=alice
            )
            assert done["done"] and not done["faulted"] and len(done["generations"]) == 1


async def test_v2_text_status_by_id_shows_only_v2_jobs(tmp_path: Path) -> None:
    """Finding 7: "GET /api/v2/generate/text/status/{id} shows any text job, including
    private v1 and OpenAI-route jobs, to whoever holds the id".

    By id alone it shows only jobs made through /api/v2 (AI Horde's rule); jobs made
    through /api/v1 or the OpenAI routes keep v1's visibility: their owner's key."""
    async with AsyncExitStack() as stack:
        live = await stack.enter_async_context(coordinator(tmp_path))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        (alice,) = await register_accounts(live.url, "alice")
        gateway = CoordinatorLink(live.url, Identity.generate(), "gateway", None)
        stack.push_async_callback(gateway.aclose)
        await gateway.register()
        assert await gateway.pop_text([LLM], wait=0) is None  # offers the model

        def status_url(job_id: str) -> str:
            return f"{live.url}/api/v2/generate/text/status/{job_id}"

        text = {"prompt": "hello", "max_tokens": 4}
        status, v1_job = await call(http, "POST", f"{live.url}/api/v1/text/jobs", text, alice)
        assert status == 202, v1_job
        v2_body = {"prompt": "hello", "params": {"max_length": 4}}
        status, v2_job = await call(
            http, "POST", f"{live.url}/api/v2/generate/text/async", v2_body, alice
        )
        assert status == 202, v2_job
        chat = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        openai = asyncio.create_task(
            call(http, "POST", f"{live.url}/v1/chat/completions", chat, alice)
        )

        async def stop_waiting() -> None:
            openai.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await openai

        stack.push_async_callback(stop_waiting)
        popped: list[str] = []
        async with asyncio.timeout(30):
            while len(popped) < 3:
                job = await gateway.pop_text([LLM], wait=5)
                if job is not None:
                    popped.append(job.id)
        openai_id = next(i for i in popped if i not in (v1_job["id"], v2_job["id"]))

        for private in (v1_job["id"], openai_id):
            status, answer = await call(http, "GET", status_url(private), key=ANONYMOUS)
            assert status == 404, answer
            status, answer = await call(http, "GET", status_url(private), key=alice)
            assert status == 200 and answer["processing"] == 1, answer
        status, answer = await call(http, "GET", status_url(v2_job["id"]), key=ANONYMOUS)
        assert status == 200 and answer["processing"] == 1, answer


async def test_anonymous_event_streams_count_as_one_key_per_address(tmp_path: Path) -> None:
    """Finding 9: "Anonymous event streams are not held to the per-key cap (40 of 40
    opened with the cap at 32)".

    Callers without a key count as one key per address: with the cap at 4, the fifth
    anonymous stream from one address is refused (429) while a registered key may still
    open its own."""
    async with AsyncExitStack() as stack:
        live = await stack.enter_async_context(coordinator(tmp_path, max_streams_per_key=4))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        (alice,) = await register_accounts(live.url, "alice")
        image = {"prompt": "a cube", "width": 64, "height": 64, "steps": 4}
        ids = []
        for _ in range(6):
            status, created = await call(http, "POST", f"{live.url}/api/v1/jobs/image", image)
            assert status == 202, created
            ids.append(created["id"])
        status, owned = await call(http, "POST", f"{live.url}/api/v1/jobs/image", image, alice)
        assert status == 202

        async def open_stream(job_id: str, key: str | None = None) -> int:
            headers = {"apikey": key} if key else {}
            resp = await http.get(f"{live.url}/api/v1/jobs/{job_id}/events", headers=headers)
            stack.callback(resp.close)
            return resp.status

        assert [await open_stream(job_id) for job_id in ids[:4]] == [200] * 4
        assert await open_stream(ids[4]) == 429
        assert await open_stream(owned["id"], alice) == 200


async def test_path_numbers_in_other_scripts_are_not_found_not_500(live: LiveApp) -> None:
    """`"¹".isdigit()` is true but `int("¹")` fails: such ids are unknown (found by the
    fuzz run), never a 500."""
    async with aiohttp.ClientSession() as http:
        for raw in ("%C2%B9", "%D9%A3", "%EF%BC%91"):  # ¹, Arabic-Indic 3, fullwidth 1
            async with http.get(f"{live.url}/api/v2/users/{raw}") as resp:
                assert resp.status == 404, (raw, await resp.text())
