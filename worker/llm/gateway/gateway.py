"""The text gateway: pops text jobs, drives generation through the swarm, streams the text
back and reports which block server served which blocks for how many tokens.

It holds the model's embeddings, final norm and LM head (`worker.llm.gateway.lm_head`);
the decoder blocks run on block servers found through the DHT (`worker.llm.swarm.client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import torch

from protocol.signing import params_hash
from protocol.text import LeasedTextJob, TextModel
from worker.common.link import CoordinatorLink, retrying
from worker.common.service import serve_jobs
from worker.errors import (
    CoordinatorRejected,
    CoordinatorUnavailable,
    LeaseLost,
    MissingBlocks,
    SwarmError,
)
from worker.llm.gateway.chat_format import render_chat
from worker.llm.gateway.config import GatewayConfig
from worker.llm.gateway.generation import GenerationResult, SamplingParams, generate
from worker.llm.gateway.lm_head import LMHead
from worker.llm.swarm.client import SwarmClient, SwarmClientConfig

__all__ = ["TextGateway", "offered_model"]

log = logging.getLogger(__name__)


class _TextSender:
    """Streams text to the coordinator without slowing generation: at most one post per
    `interval` seconds and one in flight; text made meanwhile goes in the next post."""

    def __init__(self, link: CoordinatorLink, job_id: str, interval: float) -> None:
        self._link = link
        self._job_id = job_id
        self._interval = interval
        self._last_post = float("-inf")
        self._hurry = asyncio.Event()
        self.sent = ""
        self.pending = ""
        self._task: asyncio.Task[None] | None = None
        self.lost: LeaseLost | None = None

    def add(self, text: str) -> None:
        self.pending += text
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending and self.lost is None:
            wait = self._last_post + self._interval - loop.time()
            if wait > 0 and not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._hurry.wait()
            piece = self.pending
            self._last_post = loop.time()
            try:
                await self._link.text_delta(self._job_id, len(self.sent), piece)
            except LeaseLost as exc:
                self.lost = exc
                return
            except (CoordinatorUnavailable, CoordinatorRejected) as exc:
                # The final result carries the whole text; streaming is best effort.
                log.warning("streaming text of job %s failed: %s", self._job_id, exc)
                return
            self.sent += piece
            self.pending = self.pending[len(piece) :]

    async def flush(self) -> None:
        """Send what is pending now (the result follows, so do not wait for the interval)."""
        self._hurry.set()
        if self._task is not None:
            await self._task

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class TextGateway:
    def __init__(
        self,
        config: GatewayConfig,
        link: CoordinatorLink,
        head: LMHead,
        tokenizer: Any,
        swarm: SwarmClient,
    ) -> None:
        self.config = config
        self.link = link
        self.head = head
        self.tokenizer = tokenizer
        self.swarm = swarm
        self.jobs_done = 0
        self.model = offered_model(config, head)

    @classmethod
    async def create(cls, config: GatewayConfig, link: CoordinatorLink) -> TextGateway:
        from transformers import AutoTokenizer

        head = await asyncio.to_thread(LMHead.load, config.model, None, config.threads)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(config.model))
        swarm = await SwarmClient.create(
            SwarmClientConfig(
                model_name=config.model_name,
                initial_peers=config.initial_peers,
                num_blocks=head.num_blocks,
                host_maddrs=config.host_maddrs,
            )
        )
        if not await swarm.records():
            others = await swarm.other_models()
            if others:  # servers may still come; a different name is the likelier cause
                log.warning("%s", MissingBlocks(config.model_name, [(0, head.num_blocks)], others))
        return cls(config, link, head, tokenizer, swarm)

    async def aclose(self) -> None:
        await self.swarm.aclose()

    async def run(self) -> None:
        """Serve until cancelled. CoordinatorRejected (400) if the coordinator refuses the
        model: it is not in its catalog, or has other sizes there (the message says which)."""
        registered = await retrying("register", self.link.register)
        print(
            f"idlegrid text gateway {self.config.name} ready: model {self.model.name} "
            f"({self.model.blocks} blocks, {self.model.parameters} parameters), "
            f"worker id {registered.worker_id}",
            flush=True,
        )
        await serve_jobs(
            self.link, lambda: self.link.pop_text([self.model], self.config.pop_wait), self.serve
        )

    def _prompt_ids(self, job: LeasedTextJob) -> list[int]:
        params = job.params
        if params.messages is not None:
            text = render_chat(self.tokenizer, [m.model_dump() for m in params.messages])
            # a chat template writes its own special tokens
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(params.prompt or "")["input_ids"]
        return [int(i) for i in ids]

    async def serve(self, job: LeasedTextJob) -> None:
        if params_hash(job.params) != job.params_hash:
            await self._give_back(job, "params hash mismatch: coordinator and gateway differ")
            return
        params = job.params
        prompt_ids = self._prompt_ids(job)
        if len(prompt_ids) + params.max_tokens > self.model.max_context:
            await self._give_back(
                job,
                f"the prompt is {len(prompt_ids)} tokens; with max_tokens {params.max_tokens} "
                f"it exceeds the {self.model.max_context}-token context of {self.model.name}",
                retry=False,
            )
            return
        sampling = SamplingParams(
            max_new_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            repetition_penalty=params.repetition_penalty,
            stop=tuple(params.stop),
            seed=params.seed,
        )
        sender = _TextSender(self.link, job.id, self.config.stream_interval)

        async def on_text(delta: str) -> None:
            if sender.lost is not None:
                raise sender.lost
            sender.add(delta)

        started = time.monotonic()
        try:
            async with self.swarm.session(len(prompt_ids) + params.max_tokens) as session:
                result: GenerationResult = await generate(
                    self.head,
                    session.step,
                    torch.tensor([prompt_ids]),
                    sampling,
                    self.tokenizer,
                    on_text,
                )
                spans = [
                    {"peer_id": u.peer_id, "start": u.start, "end": u.end, "tokens": u.tokens}
                    for u in session.usage
                    if u.tokens > 0
                ]
        except LeaseLost as exc:
            sender.cancel()
            log.warning("text job %s was taken back while generating: %s", job.id, exc)
            return
        except MissingBlocks as exc:
            sender.cancel()
            log.error("text job %s: %s", job.id, exc)
            await self._give_back(job, str(exc), retry=False)
            return
        except SwarmError as exc:
            sender.cancel()
            log.error("text job %s failed in the swarm: %s", job.id, exc)
            await self._give_back(job, f"{type(exc).__name__}: {exc}")
            return
        except asyncio.CancelledError:
            sender.cancel()
            await asyncio.shield(self._give_back(job, "gateway shutting down"))
            raise
        except Exception as exc:
            # one job's trouble (a bug, a tokenizer error) must not stop the gateway
            sender.cancel()
            log.exception("text job %s failed in the gateway", job.id)
            await self._give_back(job, f"gateway error: {type(exc).__name__}: {exc}")
            return
        await sender.flush()
        try:
            accepted = await retrying(
                "submit",
                lambda: self.link.submit_text(
                    job,
                    result.text,
                    result.finish_reason,
                    result.prompt_tokens,
                    result.completion_tokens,
                    spans,
                ),
            )
        except LeaseLost as exc:
            log.warning("text job %s was taken back before we finished: %s", job.id, exc)
            return
        self.jobs_done += 1
        seconds = time.monotonic() - started
        log.info(
            "text job %s: %d tokens in %.2fs (%.1f tok/s, first after %.0f ms), charged %d",
            job.id,
            result.completion_tokens,
            seconds,
            result.completion_tokens / max(result.seconds, 1e-9),
            result.first_token_seconds * 1000,
            accepted.kudos_charged,
        )

    async def _give_back(self, job: LeasedTextJob, reason: str, *, retry: bool = True) -> None:
        try:
            async with asyncio.timeout(10):
                await self.link.fail_text(job.id, reason, retry)
        except (CoordinatorUnavailable, LeaseLost, CoordinatorRejected, TimeoutError) as exc:
            log.warning("could not give text job %s back: %s", job.id, exc)


def offered_model(config: GatewayConfig, head: LMHead) -> TextModel:
    """The model and sizes this gateway offers; the coordinator serves it only if its
    catalog lists exactly these."""
    return TextModel(
        name=config.model_name,
        blocks=head.num_blocks,
        parameters=head.param_count,
        max_context=config.max_context or _max_context(head),
    )


def _max_context(head: LMHead) -> int:
    with contextlib.suppress(AttributeError, TypeError):
        return int(head.config.max_position_embeddings)
    return 2048
