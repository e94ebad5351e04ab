"""SpanCompute, the block server's confined compute: typed calls to a real sandboxed
BlockEngine on the tiny model, and an answer that does not fit its shape caught."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from protocol.engine import SessionStep
from sandbox import Sandbox, SandboxPolicy
from sandbox.errors import EngineFailed, EngineMisbehaved
from worker.llm.swarm.blocks import BlockSpan, new_cache
from worker.llm.swarm.compute import ComputeSettings, SpanCompute

REPO_ROOT = Path(__file__).resolve().parents[4]


@pytest.fixture
async def compute(tiny_models: Path) -> AsyncIterator[SpanCompute]:
    settings = ComputeSettings(tiny_models / "llm", 1, 3, None, threads=1, load_timeout=120)
    started = await SpanCompute.start(settings)
    try:
        yield started
    finally:
        await started.aclose()


def _hidden(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(seed))


def _out(answer: tuple[bytes, list[int]]) -> torch.Tensor:
    buffer, shape = answer
    return torch.frombuffer(bytearray(buffer), dtype=torch.float32).reshape(shape)


async def test_steps_and_passes_equal_the_span_run_here(
    compute: SpanCompute, tiny_models: Path
) -> None:
    span, cache = BlockSpan.load(tiny_models / "llm", 1, 3), new_cache()
    prompt, token = _hidden(5, 0), _hidden(1, 1)
    with torch.no_grad():
        want = [span.forward(prompt, cache, past=0), span.forward(token, cache, past=5)]
    got = []
    for past, hidden in ((0, prompt), (5, token)):
        shape = list(hidden.shape)
        answer = await compute.step("s1", hidden.numpy().tobytes(), "float32", shape, past, 1, 3)
        got.append(_out(answer))
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine, theirs)
    # a step at past 3 cuts the cache back first (a rollback), in both call paths; a past
    # beyond the cache is the step's error
    other = _hidden(2, 2)
    with torch.no_grad():
        cut = new_cache()
        span.forward(prompt[:, :3], cut, past=0)
        rolled = span.forward(other, cut, past=3)
    answer = await compute.step("s1", other.numpy().tobytes(), "float32", [1, 2, 64], 3, 1, 3)
    torch.testing.assert_close(_out(answer), rolled)
    steps = [
        SessionStep(session=s, past=p, dtype="float32", shape=[1, 1, 64], start=1, end=3)
        for s, p in (("s1", 4), ("s1", 9))
    ]
    answers = await compute.steps(steps[:1], [token.numpy().tobytes()])
    with torch.no_grad():
        cut = new_cache()
        span.forward(torch.cat([prompt[:, :3], other[:, :1]], dim=1), cut, past=0)
        torch.testing.assert_close(_out((answers[0][0], [1, 1, 64])), span.forward(token, cut))
    ((blob, output),) = await compute.steps(steps[1:], [token.numpy().tobytes()])
    assert blob == b"" and output.error is not None and "holds 5 tokens" in output.error
    stateless = _out(await compute.forward(prompt.numpy().tobytes(), "float32", [1, 5, 64], 1, 3))
    torch.testing.assert_close(stateless, want[0])
    compute.close("s1")
    await compute.flush()
    assert await compute.measure() > 0
    assert compute.generation == 0


async def test_bytes_that_do_not_fit_the_shape_are_a_value_error(compute: SpanCompute) -> None:
    with pytest.raises(EngineFailed, match="do not hold a float32 tensor") as info:
        await compute.forward(b"\0" * 12, "float32", [1, 5, 64], 1, 3)
    assert info.value.error_type == "ValueError"  # the server answers bad_request
    assert compute.generation == 0


async def test_an_output_that_does_not_fit_its_shape_restarts_the_compute(
    tmp_path: Path,
) -> None:
    policy = SandboxPolicy(
        workdir_root=tmp_path, extra_env={"PYTHONPATH": str(REPO_ROOT)}, start_timeout=60
    )
    sandbox = await Sandbox.create(
        "tests.worker.llm.swarm.lying_compute:ShortAnswerEngine", {}, policy
    )
    compute = SpanCompute(sandbox)
    try:
        with pytest.raises(EngineMisbehaved, match=r"blobs of \[5\] bytes .* shape \[1, 2, 64\]"):
            await compute.forward(b"\0" * 512, "float32", [1, 2, 64], 0, 1)
        with pytest.raises(EngineMisbehaved):
            await compute.step("s", b"\0" * 256, "float32", [1, 1, 64], 0, 0, 1)
        # killed each time (its caches are gone), restarted before the next call
        assert compute.generation == 1 and sandbox.pid is None
    finally:
        await compute.aclose()
