"""End to end with real processes on loopback: coordinator, two block servers (hivemind),
a text gateway, the CLI and the official OpenAI client.

Greedy text through the swarm must equal local `generate` of the same model; a block
server SIGKILLed mid-generation must not change the text when another serves its blocks;
with nobody serving some blocks the requester gets a clear error and the kudos back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from client.sdk import Client
from protocol.text import TextParams
from tests.procs import Proc

if TYPE_CHECKING:  # the client itself is imported where it is used, pointed at loopback
    from openai.types.chat import ChatCompletionMessageParam

pytestmark = pytest.mark.slow

MODEL = "llm"
SERVER_LINE = r"idlegrid block server \S+ serving blocks (\d+):(\d+) of \S+ at (\S+)"


class Swarm:
    def __init__(self, tmp: Path, models: Path) -> None:
        self.tmp = tmp
        self.models = models
        self.procs: list[Proc] = []
        self.env = {"IDLEGRID_CREDENTIALS": str(tmp / "credentials.json")}
        try:
            self.coordinator = self.start(
                "coordinator",
                [
                    "coordinator",
                    "--port",
                    "0",
                    "--data-dir",
                    str(tmp / "data"),
                    "--lease-timeout",
                    "10",
                ],
            )
            self.url = self.coordinator.wait_for(r"listening on (http://\S+)", 60).group(1)
            self.donor = self.register("donor")
            self.alice = self.register("alice")
            self.first, self.peer = self.server("server-a", "0:2", None)
            self.second, _ = self.server("server-b", "2:4", self.peer)
            self.gateway = self.start(
                "gateway",
                [
                    "worker",
                    "gateway",
                    "--coordinator",
                    self.url,
                    "--model",
                    str(models / MODEL),
                    "--initial-peers",
                    self.peer,
                    "--name",
                    "gateway",
                    "--identity",
                    str(tmp / "gateway.key"),
                    "--api-key",
                    self.donor,
                    "--threads",
                    "1",
                ],
            )
            self.gateway.wait_for("idlegrid text gateway gateway ready", 120)
        except BaseException:
            self.close()  # no process outlives a failed set-up
            raise

    def start(self, label: str, args: list[str]) -> Proc:
        proc = Proc(args, self.tmp / f"{label}-{len(self.procs)}.log", self.env)
        self.procs.append(proc)
        return proc

    def server(self, name: str, blocks: str, peer: str | None) -> tuple[Proc, str]:
        """A block server (sessions logged at debug level); returns it and its multiaddr."""
        args = [
            "worker",
            "blocks",
            "--coordinator",
            self.url,
            "--model",
            str(self.models / MODEL),
            "--blocks",
            blocks,
            "--name",
            name,
            "--identity",
            str(self.tmp / f"{name}.key"),
            "--api-key",
            self.donor,
            "--threads",
            "1",
            "--log-level",
            "DEBUG",
        ]
        args += ["--initial-peers", peer] if peer else ["--new-swarm"]
        proc = self.start(name, args)
        return proc, proc.wait_for(SERVER_LINE, 120).group(3)

    def cli(self, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env}
        if key:
            env["IDLEGRID_API_KEY"] = key
        return subprocess.run(
            [sys.executable, "-m", "client.cli", *args, "--coordinator", self.url],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    def register(self, name: str) -> str:
        done = self.cli("account", "register", name, "--json")
        assert done.returncode == 0, done.stderr
        return str(json.loads(done.stdout)["api_key"])

    def client(self, key: str) -> Client:
        return Client(self.url, key)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Swarm]:
    net = Swarm(tmp_path_factory.mktemp("swarm"), tiny_models)
    try:
        yield net
    finally:
        net.close()


def local_greedy(models: Path, prompt_ids: list[int], max_new_tokens: int) -> str:
    """The same continuation from plain transformers, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models / MODEL)
    model = AutoModelForCausalLM.from_pretrained(models / MODEL).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True))


def prompt_ids(models: Path, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(models / MODEL)(prompt)["input_ids"])


def chat_ids(models: Path, messages: list[dict[str, str]]) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models / MODEL)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_cli_complete_greedy_equals_local_generate(swarm: Swarm, tiny_models: Path) -> None:
    prompt = "def read_file(path):"
    done = swarm.cli(
        "complete", prompt, "--temperature", "0", "--max-tokens", "24", "--json", key=swarm.alice
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["text"] == local_greedy(tiny_models, prompt_ids(tiny_models, prompt), 24)
    assert result["completion_tokens"] >= 1 and result["kudos_spent"] >= 1
    with swarm.client(swarm.donor) as donor:
        # the donor owns the gateway and both servers: it earned what alice was charged
        assert donor.me().kudos > 100


def test_ai_horde_text_request_runs_on_the_swarm(swarm: Swarm, tiny_models: Path) -> None:
    """AI Horde's text side (KoboldAI-style) against the real swarm: greedy text equals
    local generate."""
    from tests.e2e.test_image_network import horde

    prompt = "class Queue:"
    ask = {"prompt": prompt, "params": {"max_length": 16, "temperature": 0}, "models": [MODEL]}
    status, created = horde(swarm.url, "POST", "/generate/text/async", swarm.alice, ask)
    assert status == 202, created
    deadline = time.monotonic() + 120
    while True:
        status, done = horde(swarm.url, "GET", f"/generate/text/status/{created['id']}", "")
        assert status == 200, done  # polled by id alone, never a 4xx while it lives
        if done["done"]:
            break
        assert time.monotonic() < deadline, done
        time.sleep(0.2)
    (generation,) = done["generations"]
    assert generation["text"] == local_greedy(tiny_models, prompt_ids(tiny_models, prompt), 16)
    assert generation["model"] == MODEL and generation["worker_name"] == "gateway"


def test_a_long_koboldai_prompt_is_cut_to_max_context_length(
    swarm: Swarm, tiny_models: Path
) -> None:
    """A 4 000-token prompt with max_context_length 512 (the tiny model's whole context):
    the gateway keeps its BOS and last 512 - 16 - 1 tokens, and the greedy answer through
    the swarm is local generate's on those tokens."""
    from tests.e2e.test_image_network import horde

    prompt = " ".join(f"line {i}: the queue holds {i * 7 % 13} items." for i in range(200))
    ids = prompt_ids(tiny_models, prompt)
    assert len(ids) >= 4000
    params = {"max_length": 16, "max_context_length": 512, "temperature": 0}
    ask = {"prompt": prompt, "params": params, "models": [MODEL]}
    status, created = horde(swarm.url, "POST", "/generate/text/async", swarm.alice, ask)
    assert status == 202, created
    deadline = time.monotonic() + 120
    while True:
        status, done = horde(swarm.url, "GET", f"/generate/text/status/{created['id']}", "")
        assert status == 200, done
        if done["done"]:
            break
        assert time.monotonic() < deadline, done
        time.sleep(0.2)
    (generation,) = done["generations"]
    kept = ids[:1] + ids[-(512 - 16 - 1) :]
    assert generation["text"] == local_greedy(tiny_models, kept, 16)


def test_openai_client_plain_and_streaming(swarm: Swarm, tiny_models: Path) -> None:
    from openai import OpenAI

    openai = OpenAI(base_url=f"{swarm.url}/v1", api_key=swarm.alice, max_retries=0)
    # the operator's catalog (built-ins), the default first
    assert [m.id for m in openai.models.list()] == [MODEL, "smollm2"]
    said = "Say something about files."
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": said}]
    prompt_ids = chat_ids(tiny_models, [{"role": "user", "content": said}])
    expected = local_greedy(tiny_models, prompt_ids, 16)
    completion = openai.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        temperature=0,
    )
    assert completion.choices[0].message.content == expected
    assert completion.usage is not None and completion.usage.completion_tokens <= 16
    stream = openai.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == expected
    with pytest.raises(Exception, match="not served") as error:
        openai.chat.completions.create(model="nope", messages=messages)
    assert getattr(error.value, "status_code", None) == 400


def test_openai_json_schema_through_the_swarm(swarm: Swarm) -> None:
    """response_format through real processes: the confined engine masks the tiny model's
    logits with the schema's grammar; stopped answers validate, at temperature 1 too."""
    import jsonschema_rs
    from openai import BadRequestError, OpenAI

    openai = OpenAI(base_url=f"{swarm.url}/v1", api_key=swarm.alice, max_retries=0)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]}},
        "required": ["ok", "size"],
        "additionalProperties": False,
    }
    completion = openai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=32,
        temperature=1.0,
        seed=5,
        n=2,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
    )
    assert len(completion.choices) == 2
    validator = jsonschema_rs.validator_for(schema)
    for choice in completion.choices:
        assert choice.finish_reason == "stop"  # this schema's JSON is a few tokens long
        assert validator.is_valid(json.loads(choice.message.content or ""))
    with pytest.raises(BadRequestError, match=r"response_format\.json_schema\.schema"):
        openai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "JSON please"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "strng"}},
            },
        )


def test_openai_tool_call_and_logprobs_through_the_swarm(swarm: Swarm) -> None:
    """A named tool call and logprobs through real processes (the confined engine makes
    the logprobs; the gateway relays them; the coordinator stores and returns them)."""
    import jsonschema_rs
    from openai import OpenAI

    openai = OpenAI(base_url=f"{swarm.url}/v1", api_key=swarm.alice, max_retries=0)
    schema = {
        "type": "object",
        "properties": {"size": {"enum": ["S", "M", "L"]}},
        "required": ["size"],
        "additionalProperties": False,
    }
    completion = openai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Pick a size"}],
        max_tokens=96,
        temperature=1.0,
        seed=3,
        tools=[{"type": "function", "function": {"name": "pick", "parameters": schema}}],
        tool_choice={"type": "function", "function": {"name": "pick"}},
        logprobs=True,
        top_logprobs=5,
    )
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "pick"
    assert jsonschema_rs.validator_for(schema).is_valid(json.loads(call.function.arguments))
    assert choice.logprobs is not None and choice.logprobs.content
    assert all(len(entry.top_logprobs) == 5 for entry in choice.logprobs.content)
    # the tokens are the text the model wrote: the call
    text = "".join(e.token for e in choice.logprobs.content)
    assert json.loads(text) == {"name": "pick", "arguments": json.loads(call.function.arguments)}


def test_chat_cli_keeps_the_conversation(swarm: Swarm) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "client.cli",
            "chat",
            "--coordinator",
            swarm.url,
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ],
        input="hello\nand then?\n",
        capture_output=True,
        text=True,
        env={**os.environ, **swarm.env, "IDLEGRID_API_KEY": swarm.alice},
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2


def _serving(proc: Proc) -> bool:
    return "opened session" in proc.output()


def test_killed_server_is_replaced_with_identical_output(swarm: Swarm, tiny_models: Path) -> None:
    spare, _ = swarm.server("server-c", "2:4", swarm.peer)
    prompt = "import os"
    # long enough (~3 s here) that the kill lands mid-generation
    expected = local_greedy(tiny_models, prompt_ids(tiny_models, prompt), 400)
    params = TextParams(prompt=prompt, max_tokens=400, temperature=0.0)
    first = threading.Event()
    outcome: dict[str, object] = {}
    with swarm.client(swarm.alice) as alice:

        def run() -> None:
            try:
                outcome["status"] = alice.complete(params, lambda _: first.set())
            except Exception as exc:  # reported below
                outcome["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        assert first.wait(60), "no text arrived"
        # whichever of the two servers of blocks 2:4 the gateway's session went to
        victim = spare if _serving(spare) else swarm.second
        victim.kill()
        killed_at = time.monotonic()
        thread.join(120)
    assert "error" not in outcome, outcome
    assert getattr(outcome["status"], "text") == expected  # noqa: B009
    assert "replacing the server of blocks 2:4" in swarm.gateway.output()
    print(f"finished {time.monotonic() - killed_at:.2f}s after the kill")


def test_uncovered_blocks_fail_clearly_and_refund(swarm: Swarm) -> None:
    for proc in swarm.procs:
        if re.search(r"serving blocks 2:4", proc.output()) and proc.popen.poll() is None:
            proc.kill()
    with swarm.client(swarm.alice) as alice:
        before = alice.me().kudos
    done = swarm.cli("complete", "x", "--max-tokens", "4", key=swarm.alice)
    assert done.returncode == 1
    assert "2:4" in done.stderr, done.stderr
    with swarm.client(swarm.alice) as alice:
        assert alice.me().kudos == before
