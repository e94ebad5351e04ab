"""The `idlegrid` command: bad input is refused locally with the field and the fix."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.cli import main
from client.credentials import Credentials
from client.sdk import AsyncClient
from protocol.params import ImageParams
from protocol.signing import Identity
from protocol.text import BUILTIN_DEFAULT_MODEL, BUILTIN_TEXT_MODELS, TextParams
from tests.conftest import LiveApp
from tests.earnings import earn
from tests.fakes import CAPS, FakeWorker, job_pngs
from worker.common.link import CoordinatorLink


def _idlegrid(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "64"], "--size: '64' is not WIDTHxHEIGHT"),
        (["--size", "65x64"], "width: 65 is not a multiple of 8"),
        (["--steps", "0"], "steps: input should be greater than or equal to 1"),
        (["--sampler", "Euler z"], "unknown sampler 'Euler z'"),
        (["-n", "-1"], "n: input should be greater than or equal to 1"),
        (["--mask", "m.png"], "--mask needs a source image: add --image FILE"),
        (["--strength", "0.5"], "--strength needs a source image"),
        (["--image", "/nonexistent/source.png"], "--image: cannot read /nonexistent/source.png"),
        (["--image", __file__], "is not a PNG, WebP or JPEG image"),
        (["--clip-skip", "13"], "clip_skip: input should be less than or equal to 12"),
        (["--seed-variation", "0"], "seed_variation: input should be greater than or equal to 1"),
        (["--sampler", "DDIM", "--karras"], "karras: sampler 'DDIM' takes no Karras sigmas"),
    ],
)
def test_generate_refuses_bad_input_before_any_network(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # port 9 (discard) on loopback: nothing listens, and nothing must be sent anyway
    code = main(["generate", "a cat", "--coordinator", "http://127.0.0.1:9", *args])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "a cat"], ["complete", "Hi"], ["chat"]])
def test_wait_timeout_must_be_positive_seconds(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        main([*command, "--wait-timeout", "0", "--coordinator", "http://127.0.0.1:9"])
    assert refused.value.code == 2
    assert "--wait-timeout: '0' is not a positive number of seconds" in capsys.readouterr().err


def test_unreachable_coordinator_is_a_clear_failure(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "a cat", "--coordinator", "http://127.0.0.1:9", "--size", "64x64"])
    assert code == 1
    assert "cannot reach the coordinator at http://127.0.0.1:9" in capsys.readouterr().err


@pytest.mark.slow
def test_worker_refuses_pickle_weights(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not really a pickle")
    done = _idlegrid(
        "worker", "image", "--coordinator", "http://127.0.0.1:9", "--model", str(checkpoint)
    )
    assert done.returncode == 2
    assert "--model" in done.stderr and "safetensors" in done.stderr


def test_credentials_file_is_private(tmp_path: Path) -> None:
    creds = Credentials(tmp_path / "c" / "credentials.json")
    creds.save("http://x/", "key-1")
    assert creds.api_key("http://x") == "key-1"
    assert (creds.path.stat().st_mode & 0o777) == 0o600


async def _cli(url: str, key: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IDLEGRID_CREDENTIALS": "/nonexistent/credentials.json"}
    if key:
        env["IDLEGRID_API_KEY"] = key
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "client.cli", *args, "--coordinator", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


@pytest.mark.slow
async def test_dry_run_quotes_and_submits_nothing(live: LiveApp) -> None:
    async with AsyncClient(live.url) as anon:
        key = (await anon.register("alice")).api_key
    done = await _cli(
        live.url, key, "generate", "a cat", "--size", "256x256", "--dry-run", "--json"
    )
    assert done.returncode == 0, done.stderr
    quote = json.loads(done.stdout)
    assert (quote["kudos_cost"], quote["balance"], quote["queue_position"]) == (3, 100, 0)
    text = await _cli(live.url, key, "generate", "a cat", "--size", "256x256", "--dry-run")
    assert "cost:     3 kudos" in text.stdout and "nothing submitted" in text.stdout
    assert (await live.store.ledger.audit())["entries"] == 1


@pytest.mark.slow
async def test_account_transfer_history_and_rate_commands(live: LiveApp) -> None:
    async with AsyncClient(live.url) as anon:
        alice = (await anon.register("alice")).api_key
        await anon.register("bob")
    refused = await _cli(live.url, alice, "account", "transfer", "bob", "5")
    assert refused.returncode == 1, refused.stderr
    assert "you can transfer at most 0 kudos now" in refused.stderr
    await earn(live.store, "alice", 5)  # granted kudos are not transferable; earned are
    sent = await _cli(
        live.url, alice, "account", "transfer", "bob", "5", "--idempotency-key", "gift-1"
    )
    assert sent.returncode == 0 and "sent 5 kudos to bob" in sent.stdout, sent.stderr
    again = await _cli(
        live.url, alice, "account", "transfer", "bob", "5", "--idempotency-key", "gift-1"
    )
    assert again.returncode == 0 and again.stdout == sent.stdout
    shown = await _cli(live.url, alice, "account", "show", "--json")
    info = json.loads(shown.stdout)
    assert (info["kudos"], info["unspent_grants"], info["transferable"]) == (100, 100, 0)
    plain_show = await _cli(live.url, alice, "account", "show")
    assert "100 unspent" in plain_show.stdout and "transferable: 0" in plain_show.stdout
    history = await _cli(live.url, alice, "account", "history", "--json")
    entries = json.loads(history.stdout)["entries"]
    assert [(e["reason"], e["amount"]) for e in entries] == [
        ("transfer", -5),
        ("mint", 5),
        ("grant", 100),
    ]
    plain = await _cli(live.url, alice, "account", "history")
    assert "transfer" in plain.stdout and "(bob)" in plain.stdout
    async with AsyncClient(live.url, alice) as grid, FakeWorker(live.url) as worker:
        created = await grid.submit_image(ImageParams(prompt="x", width=256, height=256, seed=1))
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None
        await worker.link.submit(job, [1], job_pngs(job))
        bad = await _cli(live.url, alice, "rate", created.id, "0", "11")
        assert bad.returncode == 2 and "SCORE" in bad.stderr
        rated = await _cli(live.url, alice, "rate", created.id, "0", "9")
        assert rated.returncode == 0 and "rated image 0" in rated.stdout, rated.stderr
        twice = await _cli(live.url, alice, "rate", created.id, "0", "9")
        assert twice.returncode == 2 and "already rated" in twice.stderr
        missing = await _cli(live.url, alice, "rate", created.id, "3", "9")
        assert missing.returncode == 2 and "index" in missing.stderr


@pytest.mark.slow
async def test_complete_and_cancel_a_text_job_from_the_cli(live: LiveApp) -> None:
    # the coordinator's built-in default model, offered unchanged
    model = next(m for m in BUILTIN_TEXT_MODELS if m.name == BUILTIN_DEFAULT_MODEL)
    async with AsyncClient(live.url) as anon:
        alice = (await anon.register("alice")).api_key
    gateway = CoordinatorLink(live.url, Identity.generate(), "gateway", None)
    try:
        await gateway.register()
        assert await gateway.pop_text([model], wait=0) is None  # offers the model

        async def serve() -> None:
            job = await gateway.pop_text([model], wait=10)
            assert job is not None and job.params.temperature == 0.0
            await gateway.text_delta(job.id, 0, "Hello")
            # no block servers: the usage it may report is one token through no block
            await gateway.submit_text(job, "Hello, world", "length", 0, 1, [])

        serving = asyncio.create_task(serve())
        done = await _cli(
            live.url, alice, "complete", "Hi", "--temperature", "0", "--max-tokens", "3", "--json"
        )
        await serving
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["text"] == "Hello, world" and result["finish_reason"] == "length"
        assert result["model"] == model.name and result["completion_tokens"] == 1
        bad = await _cli(live.url, alice, "complete", "Hi", "--max-tokens", "0")
        assert bad.returncode == 2 and "max_tokens" in bad.stderr
        async with AsyncClient(live.url, alice) as grid:
            queued = await grid.submit_text(TextParams(prompt="x", max_tokens=5))
        cancelled = await _cli(live.url, alice, "cancel", queued.id)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stderr
        assert (await live.store.ledger.balances())["alice"] == 100 - result["kudos_spent"]
    finally:
        await gateway.aclose()
