"""Cross-session batching of a block server's steps (`BlockServer` owns one `StepBatcher`).

Sessions' steps queue here instead of calling the compute one by one. Whenever the compute
is free, everything queued goes in one call (`SpanCompute.steps`): the decode steps of all
waiting sessions (one token each) run as one batched forward, so the steps that reach the
server while the compute is busy, or within `window` seconds of an idle one, share a pass.
A prompt (a step of many tokens) is cut into chunks of at most `chunk_tokens`, queued one
after another, and each batch takes at most `chunk_tokens` of prompt besides the decode
steps: a long prompt never holds back the other sessions' next token for more than one
chunk's worth of compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field

from protocol.engine import SessionStep
from worker.llm.swarm.compute import SpanCompute

__all__ = ["BadStep", "StepBatcher"]

log = logging.getLogger(__name__)


class BadStep(ValueError):
    """The compute could not read a step's bytes or shape (the sender's fault)."""


@dataclass
class _Item:
    step: SessionStep
    hidden: bytes
    done: asyncio.Future[tuple[bytes, list[int]]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def tokens(self) -> int:
        return self.step.shape[1]


class StepBatcher:
    """Create with `await StepBatcher.create(compute, ...)`; `aclose()` stops it (steps still
    queued then fail with CancelledError)."""

    def __init__(self, compute: SpanCompute, chunk_tokens: int, window: float) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens is {chunk_tokens}; use 1 or more")
        self._compute = compute
        self._chunk = chunk_tokens
        self._window = window
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # steps per compute call so far (tests and benchmarks read it)
        self.batch_sizes: list[int] = []

    @classmethod
    async def create(
        cls, compute: SpanCompute, chunk_tokens: int = 128, window: float = 0.0
    ) -> StepBatcher:
        batcher = cls(compute, chunk_tokens, window)
        batcher._task = asyncio.create_task(batcher._run(), name="step-batcher")
        return batcher

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            self._queue.popleft().done.cancel()

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
        """A session's next tokens (`hidden`: row-major [1, n, H] of `dtype`) through blocks
        [start, end) after `past` cached ones: the float32 output bytes and shape. Raises
        BadStep, or what the compute raises (then every step of that call fails)."""
        rows = shape[1]
        row_bytes = len(hidden) // rows if rows else 0
        pieces: list[bytes] = []
        for offset in range(0, rows, self._chunk):
            count = min(self._chunk, rows - offset)
            step = SessionStep(
                session=session,
                past=past + offset,
                dtype=dtype,
                shape=[1, count, shape[2]],
                start=start,
                end=end,
            )
            chunk = hidden[offset * row_bytes : (offset + count) * row_bytes]
            output, _ = await self._submit(_Item(step, chunk))
            pieces.append(output)
        return b"".join(pieces), [1, rows, shape[2]]

    async def _submit(self, item: _Item) -> tuple[bytes, list[int]]:
        self._queue.append(item)
        self._wake.set()
        try:
            return await item.done
        except asyncio.CancelledError:
            with contextlib.suppress(ValueError):
                self._queue.remove(item)
            raise

    def _take(self) -> list[_Item]:
        """Every queued decode step, and prompt chunks (oldest first) up to one chunk's
        worth of tokens (at least one chunk)."""
        batch: list[_Item] = []
        rest: deque[_Item] = deque()
        prompt = 0
        for item in self._queue:
            if item.tokens == 1:
                batch.append(item)
            elif prompt == 0 or prompt + item.tokens <= self._chunk:
                batch.append(item)
                prompt += item.tokens
            else:
                rest.append(item)
        self._queue = rest
        return batch

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._window > 0:
                await asyncio.sleep(self._window)  # let the other sessions' steps arrive
            while self._queue:
                batch = self._take()
                self.batch_sizes.append(len(batch))
                if len(batch) > 1:
                    log.debug("%d steps in one batch", len(batch))
                try:
                    answers = await self._compute.steps(
                        [item.step for item in batch], [item.hidden for item in batch]
                    )
                except asyncio.CancelledError:
                    for item in batch:
                        item.done.cancel()
                    raise
                except Exception as exc:
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(exc)
                    continue
                for item, (output, answer) in zip(batch, answers, strict=True):
                    if item.done.done():
                        continue  # its caller hung up
                    if answer.shape is None:
                        item.done.set_exception(BadStep(answer.error or "unreadable step"))
                    else:
                        item.done.set_result((output, answer.shape))
