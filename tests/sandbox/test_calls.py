"""Typed engine calls (`Sandbox.run`, `CallTable`) against real child processes: messages
are validated on both ends, and a malformed one from the engine names its field, kills
the child, and costs one restart, never the caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from protocol.engine import IMAGE, EngineCall, ImageProgress, ImageResult, NoMessage
from protocol.params import ImageParams
from sandbox import Sandbox
from sandbox.errors import EngineCrashed, EngineFailed, EngineMisbehaved
from tests.sandbox.engines import TypedImageEngine
from tests.sandbox.test_sandbox import GUARD, make_policy

LIAR = "tests.sandbox.engines:LyingImageEngine"
TYPED = "tests.sandbox.engines:TypedImageEngine"


def params(prompt: str, **fields: int) -> ImageParams:
    return ImageParams.model_validate(
        {"prompt": prompt, "width": 64, "height": 64, "steps": 2, "seed": 7, **fields}
    )


async def started(engine: str, tmp_path: Path) -> Sandbox:
    async with asyncio.timeout(GUARD):
        return await Sandbox.create(engine, {}, make_policy(tmp_path))


@pytest.fixture
async def liar(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with await started(LIAR, tmp_path) as sandbox:
        yield sandbox


@pytest.fixture
async def typed(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with await started(TYPED, tmp_path) as sandbox:
        yield sandbox


async def test_messages_arrive_as_their_models(typed: Sandbox) -> None:
    seen: list[ImageProgress] = []
    answer = await typed.run(IMAGE, params("honest", n=2), on_progress=seen.append)
    assert answer.data == ImageResult(seeds=[7, 8], model="typed", width=64, height=64)
    assert answer.blobs == [b"png", b"png"]
    assert seen == [ImageProgress(image=0, step=1, steps=2, n=2)]


async def test_an_honest_untyped_engine_is_understood(liar: Sandbox) -> None:
    answer = await liar.run(IMAGE, params("honest"))
    assert answer.data.seeds == [7] and answer.blobs == [b"not really a png"]


async def test_a_malformed_result_names_its_fields_and_costs_a_restart(liar: Sandbox) -> None:
    pid = liar.pid
    with pytest.raises(EngineMisbehaved) as info:
        await liar.run(IMAGE, params("bad result"))
    message = str(info.value)
    assert "malformed result during a 'image' call (ImageResult)" in message
    assert "seeds[0]:" in message and "height:" in message
    assert isinstance(info.value, EngineCrashed)
    assert liar.pid is None  # killed: its output cannot be trusted
    assert (await liar.run(IMAGE, params("honest"))).data.model == "liar"
    assert liar.restarts == 1 and liar.pid != pid


async def test_an_unknown_result_field_is_malformed(liar: Sandbox) -> None:
    with pytest.raises(EngineMisbehaved, match="owned: unknown field"):
        await liar.run(IMAGE, params("extra field"))


async def test_a_malformed_progress_message_never_reaches_the_callback(liar: Sandbox) -> None:
    seen: list[ImageProgress] = []
    with pytest.raises(EngineMisbehaved, match=r"malformed progress message.*step:.*steps:"):
        await liar.run(IMAGE, params("bad progress"), on_progress=seen.append)
    assert seen == []
    assert (await liar.run(IMAGE, params("no progress"))).data.seeds == [7]


async def test_progress_during_a_call_that_has_none_is_malformed(liar: Sandbox) -> None:
    silent: EngineCall[ImageParams, NoMessage, ImageResult] = EngineCall(
        "image", ImageParams, ImageResult
    )
    assert (await liar.run(silent, params("no progress"))).data.seeds == [7]
    with pytest.raises(EngineMisbehaved, match="emitted progress during a 'image' call"):
        await liar.run(silent, params("honest"))


async def test_the_engine_side_refuses_what_does_not_fit(typed: Sandbox) -> None:
    # a request that is not the call's model: the engine says which field, and stays up
    with pytest.raises(EngineFailed, match="prompt") as info:
        await typed.call("image", {"prompt": 3, "seed": 1})
    assert info.value.error_type == "ValidationError"
    with pytest.raises(EngineFailed, match="handles 'image' calls, not 'video'"):
        await typed.call("video", {})
    # a handler that returns or emits something else than the call's models
    with pytest.raises(EngineFailed, match="must be a ImageResult, got ImageProgress"):
        await typed.run(IMAGE, params("wrong result"))
    with pytest.raises(EngineFailed, match="must be a ImageProgress, got dict"):
        await typed.run(IMAGE, params("raw emit"))
    assert typed.restarts == 0


def test_a_call_table_dumps_the_models_and_refuses_binary_input_it_does_not_take() -> None:
    # in-process: what the child does around an engine's typed handlers
    engine = TypedImageEngine({})
    events: list[dict[str, object]] = []
    payload = params("honest").model_dump(mode="json")
    data, blobs = engine.handle("image", payload, events.append)
    expected = {"seeds": [7], "model": "typed", "width": 64, "height": 64}
    assert data == {**expected, "peak_memory_bytes": None}
    assert events == [{"image": 0, "step": 1, "steps": 2, "n": 1, "preview": None}]
    assert blobs == [b"png"]
    with pytest.raises(ValueError, match="'image' call takes no binary input"):
        engine.calls.handle("image", payload, events.append, [b"tensor"])
