"""The block server's side of its confined compute (worker.llm.swarm.compute_engine).

A block server is split in two processes. The server process keeps the network: the p2p
daemon, the DHT, its peer key and the owner's API key; it reads frames, checks their
sizes and shapes, and never decodes a stranger's tensor. The compute process, started
here through `sandbox.Sandbox` with no network, no credentials and only the model folder
readable, decodes the hidden states, runs the layers and keeps the attention caches.

If the compute process dies (or is killed for running past its time), its caches die with
it: `generation` changes, and the server refuses further steps of sessions opened before,
so their gateways replay them elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from protocol.engine import (
    BLOCK_CLOSE,
    BLOCK_FORWARD,
    BLOCK_MEASURE,
    BLOCK_STEP,
    BLOCK_STEPS,
    BlockEngineOptions,
    BlockRequest,
    EngineCall,
    HiddenPass,
    HiddenShape,
    HiddenStep,
    HiddenSteps,
    NoMessage,
    SessionStep,
    StepOutput,
    StepOutputs,
)
from sandbox import CallResult, Sandbox, SandboxPolicy
from sandbox.errors import EngineMisbehaved

__all__ = ["ENGINE", "ComputeSettings", "SpanCompute", "hidden_sizes"]

ENGINE = "worker.llm.swarm.compute_engine:BlockEngine"

RequestT = TypeVar("RequestT", HiddenPass, HiddenStep)

# bytes per number of the dtypes hidden states may travel in
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def hidden_sizes(dtype: str, count: int) -> set[int]:
    """The byte counts that may hold `count` numbers of `dtype` in hivemind's uncompressed
    layout (bfloat16 travels as its own 2 bytes or as float32); empty for other dtypes.
    The server checks a frame with it before handing it over; the compute, before decoding."""
    if dtype not in _ITEMSIZE:
        return set()
    return {_ITEMSIZE[dtype] * count} | ({4 * count} if dtype == "bfloat16" else set())


@dataclass(frozen=True)
class ComputeSettings:
    model_dir: Path
    start: int
    end: int
    # torch dtype name for the layers, or None to keep the stored one
    dtype: str | None
    threads: int
    # weight quantization: one of protocol.engine.QUANTS (worker.llm.swarm.quant)
    quant: str = "none"
    # False only for `--unsandboxed`: then the compute shares the server's user and files
    confine: bool = True
    # seconds to load the blocks, and for one step at most
    load_timeout: float = 600.0
    step_timeout: float = 300.0


class SpanCompute:
    """Create with `await SpanCompute.start(settings)`; one call at a time (like one
    compute thread: steps of all sessions queue)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        self._closing: list[str] = []

    @classmethod
    async def start(cls, settings: ComputeSettings) -> SpanCompute:
        policy = SandboxPolicy(
            confine=settings.confine,
            read_only=(settings.model_dir.resolve(),),
            packages=("sandbox", "protocol", "worker"),
            start_timeout=settings.load_timeout,
            job_timeout=settings.step_timeout,
            extra_env={
                "OMP_NUM_THREADS": str(settings.threads),
                "HF_HUB_OFFLINE": "1",
            },
        )
        options = BlockEngineOptions(
            model_dir=str(settings.model_dir.resolve()),
            start=settings.start,
            end=settings.end,
            dtype=settings.dtype,
            threads=settings.threads,
            quant=settings.quant,
        )
        return cls(await Sandbox.create(ENGINE, options.model_dump(mode="json"), policy))

    @property
    def generation(self) -> int:
        """Changes whenever a fresh compute process (with no caches) replaced the last."""
        return self._sandbox.restarts

    async def step(
        self,
        session: str,
        hidden: bytes,
        dtype: str,
        shape: list[int],
        past: int,
        start: int,
        end: int,
    ) -> tuple[bytes, list[int]]:
        """The span's output (float32 bytes, shape) for the session's next tokens."""
        request = HiddenStep(
            session=session,
            past=past,
            dtype=dtype,
            shape=shape,
            start=start,
            end=end,
            close=self._take_closing(),
        )
        return await self._call(BLOCK_STEP, request, hidden)

    async def steps(
        self, steps: list[SessionStep], hiddens: list[bytes]
    ) -> list[tuple[bytes, StepOutput]]:
        """Several sessions' next tokens in one call (`worker.llm.swarm.batcher`): each
        step's output bytes and shape, or its `error` (bytes it could not read)."""
        request = HiddenSteps(steps=steps, close=self._take_closing())
        result = await self._sandbox.run(BLOCK_STEPS, request, blobs=hiddens, check=_outputs)
        return list(zip(result.blobs, result.data.outputs, strict=True))

    async def forward(
        self, hidden: bytes, dtype: str, shape: list[int], start: int, end: int
    ) -> tuple[bytes, list[int]]:
        """A stateless pass (no cache)."""
        request = HiddenPass(
            dtype=dtype, shape=shape, start=start, end=end, close=self._take_closing()
        )
        return await self._call(BLOCK_FORWARD, request, hidden)

    def close(self, session: str) -> None:
        """Forget a session's cache: sent along with the next call (or `flush`)."""
        self._closing.append(session)

    async def flush(self) -> None:
        """Send pending closes now (when the server is idle, caches are freed here)."""
        if self._closing:
            await self._sandbox.run(BLOCK_CLOSE, BlockRequest(close=self._take_closing()))

    async def measure(self) -> float:
        result = await self._sandbox.run(BLOCK_MEASURE, BlockRequest())
        return result.data.tokens_per_second

    def _take_closing(self) -> list[str]:
        closing, self._closing = self._closing, []
        return closing

    async def _call(
        self,
        call: EngineCall[RequestT, NoMessage, HiddenShape],
        request: RequestT,
        hidden: bytes,
    ) -> tuple[bytes, list[int]]:
        result = await self._sandbox.run(call, request, blobs=[hidden], check=_one_output)
        return result.blobs[0], result.data.shape

    async def aclose(self) -> None:
        await self._sandbox.aclose()


def _outputs(result: CallResult[StepOutputs]) -> None:
    """EngineMisbehaved unless each step has a float32 output of its shape, or an error."""
    outputs = result.data.outputs
    sizes = [len(blob) for blob in result.blobs]
    wanted = [0 if out.shape is None else 4 * math.prod(out.shape) for out in outputs]
    if sizes != wanted or any((out.shape is None) == (out.error is None) for out in outputs):
        raise EngineMisbehaved(
            f"the compute process answered blobs of {sizes} bytes for outputs {outputs}"
        )


def _one_output(result: CallResult[HiddenShape]) -> None:
    """EngineMisbehaved unless the answer is one float32 tensor of the shape it names."""
    sizes = [len(blob) for blob in result.blobs]
    if sizes != [4 * math.prod(result.data.shape)]:
        raise EngineMisbehaved(
            f"the compute process answered blobs of {sizes} bytes for a float32 output "
            f"of shape {result.data.shape}"
        )
