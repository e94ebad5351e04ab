"""The text gateway's confined engine: generation (worker.llm.gateway.core) in a sandbox.

It keeps the network (its swarm client reaches block servers through a p2p daemon) but no
credentials and no file but the model, read-only; the gateway process holds the API key
and identity and only relays what this engine returns. The swarm client is asynchronous,
so the engine runs an event loop on a thread of its own for its whole life, and each
request waits there for its coroutine.

Requests:
    info      {} -> {name, blocks, parameters, max_context}
    generate  {params (TextParams as JSON)} -> {text, finish_reason, prompt_tokens,
              completion_tokens, first_token_seconds, seconds, spans, checks}; emits
              {"text": delta} while it generates
    stats     {} -> CheckStats as JSON, and the peers banned now
    configure {check_rate} -> {}: the share of jobs checked from now on
    refresh   {} -> {records}: re-read the swarm's records (tests)
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from protocol.text import TextParams
from worker.llm.gateway.core import CoreSettings, GenerationCore

__all__ = ["GenerationEngine"]

T = TypeVar("T")


class GenerationEngine:
    """options: `CoreSettings.to_options()`."""

    def __init__(self, options: dict[str, Any]) -> None:
        settings = CoreSettings.from_options(options)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="swarm", daemon=True).start()
        self.core = self._wait(GenerationCore.create(settings))

    def _wait(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def handle(
        self, kind: str, payload: dict[str, Any], emit: Callable[[dict[str, Any]], None]
    ) -> tuple[dict[str, Any], list[bytes]]:
        core = self.core
        if kind == "info":
            return core.model.model_dump(), []
        if kind == "generate":
            params = TextParams.model_validate(payload["params"])

            async def on_text(delta: str) -> None:
                emit({"text": delta})

            generated = self._wait(core.run(params, on_text))
            result = generated.result
            spans = [
                {"peer_id": peer, "start": start, "end": end, "tokens": tokens}
                for (peer, start, end), tokens in generated.spans.items()
                if tokens > 0
            ]
            return {
                "text": result.text,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "first_token_seconds": result.first_token_seconds,
                "seconds": result.seconds,
                "spans": spans,
                "checks": [check.model_dump() for check in generated.checks],
            }, []
        if kind == "stats":
            stats = dataclasses.asdict(core.stats)
            stats["checks"] = [check.model_dump() for check in core.stats.checks]
            peers = {check.peer_id for check in core.stats.checks}
            stats["banned"] = sorted(peer for peer in peers if core.swarm.is_banned(peer))
            return stats, []
        if kind == "configure":
            rate = float(payload["check_rate"])
            core.settings = dataclasses.replace(core.settings, check_rate=rate)
            return {}, []
        if kind == "refresh":
            records = self._wait(core.swarm.records(refresh=True))
            return {"records": [record.peer_id for record in records]}, []
        raise ValueError(f"unknown request {kind!r}")
