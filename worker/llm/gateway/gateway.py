"""The text gateway: pops text jobs, drives generation through the swarm, streams the text
back and reports which block server served which blocks for how many tokens.

It holds the model's embeddings, final norm and LM head (`worker.llm.gateway.lm_head`);
the decoder blocks run on block servers found through the DHT (`worker.llm.swarm.client`).

A `check_rate` share of jobs is spot-checked (`worker.llm.swarm.checks`) once generated:
every server of the session has a prefix of its answers recomputed by another server of
the same blocks. A server found wrong is banned from routes for `check_ban_seconds` and,
if the job used it, the job is generated again without it (the text streamed so far is
replaced by the final result); a disagreement nobody could decide bans the server only
for the swarm client's usual `ban_seconds`. The checks go into the signed result report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from protocol.signing import params_hash
from protocol.text import LeasedTextJob, ServerCheck, TextModel
from worker.common.link import CoordinatorLink, retrying
from worker.common.service import serve_jobs
from worker.errors import (
    CoordinatorRejected,
    CoordinatorUnavailable,
    LeaseLost,
    MissingBlocks,
    SwarmError,
    SwarmStepFailed,
)
from worker.llm.gateway.chat_format import render_chat
from worker.llm.gateway.config import GatewayConfig
from worker.llm.gateway.generation import (
    GenerationResult,
    OnText,
    SamplingParams,
    generate,
)
from worker.llm.gateway.lm_head import LMHead
from worker.llm.swarm.checks import check_hop
from worker.llm.swarm.client import InferenceSession, SwarmClient, SwarmClientConfig

__all__ = ["TextGateway", "offered_model"]

log = logging.getLogger(__name__)

# generations of one job: the first, and redos after a server it used was found wrong
MAX_GENERATIONS = 3
# checks one result report carries (protocol.text.TextResultSubmit)
MAX_CHECKS = 64


@dataclass
class CheckStats:
    """What this gateway's spot checks found and cost since it started."""

    # block-tokens the servers computed for jobs (sum of tokens x blocks over the spans)
    served_block_tokens: int = 0
    # block-tokens the checkers computed
    checked_block_tokens: int = 0
    jobs: int = 0
    checked_jobs: int = 0
    # jobs in which a check found some server wrong
    caught_jobs: int = 0
    # every check made, oldest first
    checks: list[ServerCheck] = field(default_factory=list)


@dataclass
class _Generated:
    result: GenerationResult
    # (peer_id, start, end) -> tokens, over all generations of the job
    spans: dict[tuple[str, int, int], int]
    checks: list[ServerCheck]


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
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.link = link
        self.head = head
        self.tokenizer = tokenizer
        self.swarm = swarm
        self.jobs_done = 0
        self.model = offered_model(config, head)
        self.rng = rng or random.Random()
        self.stats = CheckStats()

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
            generated = await self._generate(prompt_ids, params.max_tokens, sampling, on_text)
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
        result = generated.result
        spans = [
            {"peer_id": peer, "start": start, "end": end, "tokens": tokens}
            for (peer, start, end), tokens in generated.spans.items()
            if tokens > 0
        ]
        checks = [check.model_dump() for check in generated.checks[:MAX_CHECKS]]
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
                    checks,
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

    async def _generate(
        self, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams, on_text: OnText
    ) -> _Generated:
        """Generate through the swarm, spot-check the servers (`check_rate` of the jobs) and
        generate again without any server found wrong that the answer went through.
        SwarmStepFailed if every generation went through a wrong server."""
        avoid: set[str] = set()
        spans: dict[tuple[str, int, int], int] = {}
        checks: list[ServerCheck] = []
        checked = caught = False
        self.stats.jobs += 1
        for generation in range(MAX_GENERATIONS):
            max_length = len(prompt_ids) + max_tokens
            async with self.swarm.session(max_length, frozenset(avoid)) as session:
                result = await generate(
                    self.head,
                    session.step,
                    torch.tensor([prompt_ids]),
                    sampling,
                    self.tokenizer,
                    # a redo's text replaces the streamed text when the result is submitted
                    on_text if generation == 0 else None,
                )
            for usage in session.usage:
                key = (usage.peer_id, usage.start, usage.end)
                spans[key] = spans.get(key, 0) + usage.tokens
                self.stats.served_block_tokens += usage.tokens * (usage.end - usage.start)
            if self.rng.random() >= self.config.check_rate:
                return _Generated(result, spans, checks)
            if not checked:
                checked = True
                self.stats.checked_jobs += 1
            found = await self._check(session)
            checks += found
            wrong = {check.peer_id for check in found if check.verdict == "wrong"}
            used = {states.hop.peer_id for states in session.served}
            if wrong and not caught:
                caught = True
                self.stats.caught_jobs += 1
            if not wrong & used:
                return _Generated(result, spans, checks)
            log.warning("redoing a job without the servers found wrong: %s", sorted(wrong))
            avoid |= wrong
        raise SwarmStepFailed(
            f"servers found wrong in each of {MAX_GENERATIONS} generations of this job"
        )

    async def _check(self, session: InferenceSession) -> list[ServerCheck]:
        """Spot-check every server of a finished session; ban the ones found wrong."""
        found: list[ServerCheck] = []
        for states in session.served:
            outcome = await check_hop(self.swarm, states, self.rng, self.config.check_tolerance)
            if outcome is None:
                continue
            check = outcome.check
            self.stats.checked_block_tokens += outcome.block_tokens
            self.stats.checks.append(check)
            found.append(check)
            if check.verdict == "wrong":
                log.warning(
                    "block server %s returned wrong hidden states for blocks %d:%d "
                    "(checked by %s); banned for %gs",
                    check.peer_id,
                    check.start,
                    check.end,
                    ", ".join(check.checkers),
                    self.config.check_ban_seconds,
                )
                self.swarm.ban(check.peer_id, self.config.check_ban_seconds)
            elif check.verdict == "undecided":
                log.warning(
                    "block server %s disagrees with %s on blocks %d:%d; nobody to decide",
                    check.peer_id,
                    check.checkers[0],
                    check.start,
                    check.end,
                )
                self.swarm.ban(check.peer_id)
        return found

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
