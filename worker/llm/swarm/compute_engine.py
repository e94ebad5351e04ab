"""The block server's layer compute, run inside a sandbox (worker.llm.swarm.compute starts it).

This is the only code of a block server that turns bytes from strangers into tensors and
runs the model's layers on them, so it is the part confined: no network, no credentials,
no files but the model (read-only). It holds the attention caches of the open sessions.

Requests (`Sandbox.call(kind, payload, blobs=...)`):
    step     {session, past, start, end, dtype, shape} + [hidden bytes] -> [output bytes]
    forward  {start, end, dtype, shape} + [hidden bytes] -> [output bytes] (no cache)
    close    {sessions: [...]} -> {} (drops their caches)
    measure  {} -> {tokens_per_second}
Every request may also carry `close: [...]`, sessions to drop first. Outputs are float32,
row-major, with their shape in the answer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from worker.llm.swarm.blocks import BlockSpan, new_cache
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
    """options: {model_dir, start, end, dtype (a torch dtype name or None), threads}."""

    def __init__(self, options: dict[str, Any]) -> None:
        torch.set_num_threads(int(options["threads"]))
        dtype = options.get("dtype")
        self.span = BlockSpan.load(
            Path(options["model_dir"]),
            int(options["start"]),
            int(options["end"]),
            None if dtype is None else _DTYPES[dtype],
        )
        self.caches: dict[str, Any] = {}

    def handle(
        self,
        kind: str,
        payload: dict[str, Any],
        emit: Any,
        blobs: list[bytes] | None = None,
    ) -> tuple[dict[str, Any], list[bytes]]:
        for session in payload.get("close", ()):
            self.caches.pop(session, None)
        if kind == "close":
            return {}, []
        if kind == "measure":
            return {"tokens_per_second": self.span.measure_throughput()}, []
        if kind not in ("step", "forward") or not blobs or len(blobs) != 1:
            raise ValueError(f"unknown request {kind!r}, or not exactly one tensor")
        hidden = decode_hidden(blobs[0], payload["dtype"], payload["shape"])
        cache = None
        if kind == "step":
            cache = self.caches.get(payload["session"])
            if cache is None:
                cache = self.caches[payload["session"]] = new_cache()
        output = self.span.forward(
            hidden, cache, past=int(payload.get("past", 0)), start=payload["start"],
            end=payload["end"],
        )  # fmt: skip
        output = output.to(torch.float32).contiguous()
        return {"shape": list(output.shape)}, [output.numpy().tobytes()]
