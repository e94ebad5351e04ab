"""The block server's layer compute, run inside a sandbox (worker.llm.swarm.compute starts it).

This is the only code of a block server that turns bytes from strangers into tensors and
runs the model's layers on them, so it is the part confined: no network, no credentials,
no files but the model (read-only). It holds the attention caches of the open sessions.

Calls (`protocol.engine`, through a `sandbox.calls.CallTable`):
    BLOCK_STEP     HiddenStep + [hidden bytes] -> HiddenShape + [output bytes]
    BLOCK_STEPS    HiddenSteps + [hidden bytes per step] -> StepOutputs + [output per step]:
                   steps of the same blocks and token count run as one batched forward
                   (`worker.llm.swarm.batched`); a step whose bytes cannot be read fails
                   alone
    BLOCK_FORWARD  HiddenPass + [hidden bytes] -> HiddenShape + [output bytes] (no cache)
    BLOCK_CLOSE    drops the caches of the sessions named
    BLOCK_MEASURE  -> Throughput
Every request may also name in `close` sessions to drop first. Outputs are float32,
row-major, with their shape in the answer. A step's `past` is where its tokens start: a
session cache holding more is cut to `past` tokens first (a rollback, see
`worker.llm.swarm.wire`); one holding fewer is an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from protocol.engine import (
    BLOCK_CLOSE,
    BLOCK_FORWARD,
    BLOCK_MEASURE,
    BLOCK_STEP,
    BLOCK_STEPS,
    BlockEngineOptions,
    BlockRequest,
    HiddenPass,
    HiddenShape,
    HiddenStep,
    HiddenSteps,
    NoMessage,
    StepOutput,
    StepOutputs,
    Throughput,
)
from sandbox.calls import CallTable, Emit
from worker.llm.swarm.batched import forward_batch
from worker.llm.swarm.blocks import BlockSpan, cache_length, new_cache, truncate_cache
from worker.llm.swarm.compute import hidden_sizes

__all__ = ["BlockEngine", "decode_hidden"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def decode_hidden(buffer: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    """A tensor from raw row-major bytes (hivemind's uncompressed layout: bfloat16 travels
    as float32 or as its own 2 bytes). ValueError when the bytes do not fit the shape."""
    if dtype not in _DTYPES:
        raise ValueError(f"hidden states of dtype {dtype!r}; send float32, float16 or bfloat16")
    if not shape or any(not isinstance(size, int) or size < 0 for size in shape):
        raise ValueError(f"bad shape {shape!r}")
    count = math.prod(shape)
    if len(buffer) not in hidden_sizes(dtype, count):
        raise ValueError(
            f"{len(buffer)} bytes do not hold a {dtype} tensor of shape {tuple(shape)}"
        )
    torch_dtype = _DTYPES[dtype]
    if dtype == "bfloat16" and len(buffer) == 4 * count:  # sent as float32
        torch_dtype = torch.float32
    if count == 0:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(buffer), dtype=torch_dtype).reshape(shape)


class BlockEngine:
    """options: `protocol.engine.BlockEngineOptions` as JSON."""

    def __init__(self, options: Mapping[str, object]) -> None:
        settings = BlockEngineOptions.model_validate(options)
        torch.set_num_threads(settings.threads)
        dtype = settings.dtype
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}; use float32, float16 or bfloat16")
        self.span = BlockSpan.load(
            Path(settings.model_dir),
            settings.start,
            settings.end,
            None if dtype is None else _DTYPES[dtype],
            settings.quant,
        )
        self.caches: dict[str, object] = {}  # session -> its attention cache
        self.calls = CallTable()
        self.calls.add_binary(BLOCK_STEP, self.step)
        self.calls.add_binary(BLOCK_STEPS, self.steps)
        self.calls.add_binary(BLOCK_FORWARD, self.forward)
        self.calls.add(BLOCK_CLOSE, self.close)
        self.calls.add(BLOCK_MEASURE, self.measure)

    def handle(
        self,
        kind: str,
        payload: Mapping[str, object],
        emit: Callable[[dict[str, object]], None],
        blobs: list[bytes] | None = None,
    ) -> tuple[dict[str, object], list[bytes]]:
        """`Engine.handle`: validates `payload` as the call's request."""
        return self.calls.handle(kind, payload, emit, blobs)

    def _drop(self, request: BlockRequest) -> None:
        for session in request.close:
            self.caches.pop(session, None)

    def close(self, request: BlockRequest, emit: Emit[NoMessage]) -> tuple[NoMessage, list[bytes]]:
        self._drop(request)
        return NoMessage(), []

    def measure(
        self, request: BlockRequest, emit: Emit[NoMessage]
    ) -> tuple[Throughput, list[bytes]]:
        self._drop(request)
        return Throughput(tokens_per_second=self.span.measure_throughput()), []

    def step(
        self, request: HiddenStep, blobs: list[bytes], emit: Emit[NoMessage]
    ) -> tuple[HiddenShape, list[bytes]]:
        self._drop(request)
        cache = self._cache(request.session, request.past)
        return self._run(request, blobs, cache, request.past)

    def _cache(self, session: str, past: int) -> object:
        """The session's cache holding exactly its first `past` tokens (cut if it holds
        more); ValueError if it holds fewer."""
        cache = self.caches.get(session)
        if cache is None:
            cache = self.caches[session] = new_cache()
        held = cache_length(cache)
        if held < past:
            raise ValueError(f"the session's cache holds {held} tokens, not the {past} stepped on")
        if held > past:
            truncate_cache(cache, past)
        return cache

    def steps(
        self, request: HiddenSteps, blobs: list[bytes], emit: Emit[NoMessage]
    ) -> tuple[StepOutputs, list[bytes]]:
        self._drop(request)
        if len(blobs) != len(request.steps):
            raise ValueError(f"send one tensor per step: {len(request.steps)}, not {len(blobs)}")
        outputs: list[StepOutput | None] = [None] * len(blobs)
        answers = [b""] * len(blobs)
        groups: dict[tuple[int, int, int], list[tuple[int, torch.Tensor, object]]] = {}
        for index, (step, blob) in enumerate(zip(request.steps, blobs, strict=True)):
            try:
                hidden = decode_hidden(blob, step.dtype, step.shape)
                if hidden.dim() != 3 or hidden.shape[0] != 1:
                    raise ValueError(f"a step takes [1, n, H], got {tuple(hidden.shape)}")
                cache = self._cache(step.session, step.past)
            except ValueError as exc:
                outputs[index] = StepOutput(error=str(exc))
                continue
            group = groups.setdefault((step.start, step.end, hidden.shape[1]), [])
            group.append((index, hidden, cache))
        for (start, end, _), members in groups.items():
            results = forward_batch(
                self.span,
                [hidden for _, hidden, _ in members],
                [cache for _, _, cache in members],
                [request.steps[index].past for index, _, _ in members],
                start,
                end,
            )
            for (index, _, _), output in zip(members, results, strict=True):
                output = output.to(torch.float32).contiguous()
                outputs[index] = StepOutput(shape=list(output.shape))
                answers[index] = output.numpy().tobytes()
        return StepOutputs(outputs=[output or StepOutput(error="") for output in outputs]), answers

    def forward(
        self, request: HiddenPass, blobs: list[bytes], emit: Emit[NoMessage]
    ) -> tuple[HiddenShape, list[bytes]]:
        self._drop(request)
        return self._run(request, blobs, None, 0)

    def _run(
        self, request: HiddenPass, blobs: list[bytes], cache: object | None, past: int
    ) -> tuple[HiddenShape, list[bytes]]:
        if len(blobs) != 1:
            raise ValueError(f"send exactly one tensor, not {len(blobs)}")
        hidden = decode_hidden(blobs[0], request.dtype, request.shape)
        output = self.span.forward(hidden, cache, past=past, start=request.start, end=request.end)
        output = output.to(torch.float32).contiguous()
        return HiddenShape(shape=list(output.shape)), [output.numpy().tobytes()]
