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

from dataclasses import dataclass
from pathlib import Path

from sandbox import Sandbox, SandboxPolicy

__all__ = ["ENGINE", "ComputeSettings", "SpanCompute", "hidden_sizes"]

ENGINE = "worker.llm.swarm.compute_engine:BlockEngine"

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
        options = {
            "model_dir": str(settings.model_dir.resolve()),
            "start": settings.start,
            "end": settings.end,
            "dtype": settings.dtype,
            "threads": settings.threads,
        }
        return cls(await Sandbox.create(ENGINE, options, policy))

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
        payload = {"session": session, "past": past, "dtype": dtype, "shape": shape}
        return await self._call("step", {**payload, "start": start, "end": end}, hidden)

    async def forward(
        self, hidden: bytes, dtype: str, shape: list[int], start: int, end: int
    ) -> tuple[bytes, list[int]]:
        """A stateless pass (no cache)."""
        payload = {"dtype": dtype, "shape": shape, "start": start, "end": end}
        return await self._call("forward", payload, hidden)

    def close(self, session: str) -> None:
        """Forget a session's cache: sent along with the next call (or `flush`)."""
        self._closing.append(session)

    async def flush(self) -> None:
        """Send pending closes now (when the server is idle, caches are freed here)."""
        if self._closing:
            closing, self._closing = self._closing, []
            await self._sandbox.call("close", {"close": closing})

    async def measure(self) -> float:
        result = await self._sandbox.call("measure", {})
        return float(result.data["tokens_per_second"])

    async def _call(
        self, kind: str, payload: dict[str, object], hidden: bytes
    ) -> tuple[bytes, list[int]]:
        closing, self._closing = self._closing, []
        result = await self._sandbox.call(kind, {**payload, "close": closing}, blobs=[hidden])
        shape = [int(size) for size in result.data["shape"]]
        return result.blobs[0], shape

    async def aclose(self) -> None:
        await self._sandbox.aclose()
