"""The text gateway's confined engine: generation (worker.llm.gateway.core) in a sandbox.

It keeps the network (its swarm client reaches block servers through a p2p daemon) but no
credentials and no file but the model, read-only; the gateway process holds the API key
and identity and only relays what this engine returns. The swarm client is asynchronous,
so the engine runs an event loop on a thread of its own for its whole life, and each
request waits there for its coroutine.

Calls (`protocol.engine`, served through a `sandbox.calls.CallTable`):
    TEXT_INFO       the model: name, blocks, parameters, max_context
    TEXT_GENERATE   one text job; emits TextChunk deltas while it generates
    TEXT_START      one text job more, run beside the others (`running.RunningJobs`)
    TEXT_POLL       the running jobs' text, results and failures since the last poll
    TEXT_CANCEL     stop a running job
    TEXT_STATS      the spot checks so far (core.CheckStats) and the peers banned now
    TEXT_CONFIGURE  the share of jobs checked from now on
    TEXT_REFRESH    re-read the swarm's records (tests)
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from protocol.engine import (
    TEXT_CANCEL,
    TEXT_CONFIGURE,
    TEXT_GENERATE,
    TEXT_INFO,
    TEXT_POLL,
    TEXT_REFRESH,
    TEXT_START,
    TEXT_STATS,
    CancelText,
    CheckRate,
    EngineStats,
    GeneratedText,
    GenerateText,
    NoMessage,
    PollText,
    StartText,
    SwarmPeers,
    TextChunk,
    TextEvents,
)
from protocol.text import ServedSpan, TextModel
from sandbox.calls import CallTable, Emit
from worker.llm.gateway.core import CoreSettings, Generated, GenerationCore
from worker.llm.gateway.logprobs import report
from worker.llm.gateway.running import RunningJobs

__all__ = ["GenerationEngine"]

T = TypeVar("T")


class GenerationEngine:
    """options: `CoreSettings.to_options()`."""

    def __init__(self, options: dict[str, Any]) -> None:
        settings = CoreSettings.from_options(options)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="swarm", daemon=True).start()
        self.core = self._wait(GenerationCore.create(settings))
        self.calls = CallTable()
        self.calls.add(TEXT_INFO, self.info)
        self.running = RunningJobs(self._loop, self.core, self._answer)
        self.calls.add(TEXT_GENERATE, self.generate)
        self.calls.add(TEXT_START, self.start)
        self.calls.add(TEXT_POLL, self.poll)
        self.calls.add(TEXT_CANCEL, self.cancel)
        self.calls.add(TEXT_STATS, self.stats)
        self.calls.add(TEXT_CONFIGURE, self.configure)
        self.calls.add(TEXT_REFRESH, self.refresh)

    def _wait(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def handle(
        self, kind: str, payload: Mapping[str, object], emit: Callable[[dict[str, object]], None]
    ) -> tuple[dict[str, object], list[bytes]]:
        """`Engine.handle`: validates `payload` as the call's request."""
        return self.calls.handle(kind, payload, emit)

    def info(self, _: NoMessage, emit: Emit[NoMessage]) -> tuple[TextModel, list[bytes]]:
        return self.core.model, []

    def generate(
        self, request: GenerateText, emit: Emit[TextChunk]
    ) -> tuple[GeneratedText, list[bytes]]:
        async def on_text(delta: str) -> None:
            emit(TextChunk(text=delta))

        generated = self._wait(self.core.run(request.params, on_text, request.requester))
        return self._answer(generated), []

    def start(self, request: StartText, emit: Emit[NoMessage]) -> tuple[NoMessage, list[bytes]]:
        self.running.start(request.job, request.params, request.requester)
        return NoMessage(), []

    def poll(self, request: PollText, emit: Emit[NoMessage]) -> tuple[TextEvents, list[bytes]]:
        return TextEvents(events=self.running.poll(request.wait)), []

    def cancel(self, request: CancelText, emit: Emit[NoMessage]) -> tuple[NoMessage, list[bytes]]:
        self.running.cancel(request.job)
        return NoMessage(), []

    def _answer(self, generated: Generated) -> GeneratedText:
        result = generated.result
        spans = [
            ServedSpan(peer_id=peer, start=start, end=end, tokens=tokens)
            for (peer, start, end), tokens in generated.spans.items()
            if tokens > 0
        ]
        return GeneratedText(
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            first_token_seconds=result.first_token_seconds,
            seconds=result.seconds,
            spans=spans,
            checks=generated.checks,
            logprobs=None
            if result.logprobs is None
            else report(self.core.tokenizer, result.logprobs, result.text),
        )

    def stats(self, _: NoMessage, emit: Emit[NoMessage]) -> tuple[EngineStats, list[bytes]]:
        stats = self.core.stats
        peers = {check.peer_id for check in stats.checks}
        answer = EngineStats(
            served_block_tokens=stats.served_block_tokens,
            checked_block_tokens=stats.checked_block_tokens,
            jobs=stats.jobs,
            checked_jobs=stats.checked_jobs,
            caught_jobs=stats.caught_jobs,
            checks=list(stats.checks),
            banned=sorted(peer for peer in peers if self.core.swarm.is_banned(peer)),
        )
        return answer, []

    def configure(self, request: CheckRate, emit: Emit[NoMessage]) -> tuple[NoMessage, list[bytes]]:
        self.core.settings = dataclasses.replace(self.core.settings, check_rate=request.check_rate)
        return NoMessage(), []

    def refresh(self, _: NoMessage, emit: Emit[NoMessage]) -> tuple[SwarmPeers, list[bytes]]:
        records = self._wait(self.core.swarm.records(refresh=True))
        return SwarmPeers(records=[record.peer_id for record in records]), []
