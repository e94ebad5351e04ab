"""The text gateway's generation: embeddings, the swarm, the LM head, sampling, spot checks.

Everything here touches what strangers send (block servers' hidden states), so it runs in
the gateway's confined engine process (`worker.llm.gateway.engine`), which keeps the
network for the swarm but holds no credentials and reads no file but the model. The
gateway process (`worker.llm.gateway.gateway`) keeps the coordinator link and the keys.

A `check_rate` share of jobs is spot-checked (`worker.llm.swarm.checks`) once generated:
every server of the session has a prefix of its answers recomputed by another server of
the same blocks. A server found wrong is banned from routes for `check_ban_seconds` and,
if the job used it, the job is generated again without it (the text streamed so far is
replaced by the final result); a disagreement nobody could decide bans the server only
for the swarm client's usual `ban_seconds`. The checks go into the signed result report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protocol.openai_tools import tools_of
from protocol.text import ServerCheck, TextModel, TextParams
from worker.errors import InvalidGenerationInput, MissingBlocks, SwarmStepFailed
from worker.llm.gateway.chat_format import render_chat
from worker.llm.gateway.generation import (
    GenerationResult,
    OnText,
    SamplingParams,
    Step,
    generate,
)
from worker.llm.gateway.head_batch import BatchedHead
from worker.llm.gateway.kept import Close, KeptSessions
from worker.llm.gateway.kobold import fit_context, format_output
from worker.llm.gateway.lm_head import LMHead
from worker.llm.gateway.speculative import DraftSettings, Speculation
from worker.llm.swarm.checks import check_hop
from worker.llm.swarm.routing import SwarmClient, SwarmClientConfig
from worker.llm.swarm.session import InferenceSession

__all__ = [
    "CheckStats",
    "CoreSettings",
    "Generated",
    "GenerationCore",
    "PromptTooLong",
    "offered_model",
    "sampling_params",
]

log = logging.getLogger(__name__)

# generations of one job: the first, and redos after a server it used was found wrong
MAX_GENERATIONS = 3


class PromptTooLong(ValueError):
    """The prompt and max_tokens exceed the model's context (the job cannot be served)."""


@dataclass(frozen=True)
class CoreSettings:
    """What the generation needs of the gateway's configuration (no credentials)."""

    model: Path
    model_name: str
    initial_peers: tuple[str, ...]
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    threads: int | None = None
    max_context: int | None = None
    check_rate: float = 0.3
    check_tolerance: float = 0.1
    check_ban_seconds: float = 3600.0
    # most tokens drafted per step (worker.llm.gateway.speculative); 0 = plain decoding
    draft_tokens: int = 8
    # seconds a finished job's session is kept for its requester's next turn (0 = off)
    session_keep: float = 0.0
    # jobs run at once; kept sessions use only the slots they leave free
    max_sessions: int = 8
    # seeds the check-or-not draws (benchmarks); None = random
    seed: int | None = None

    def to_options(self) -> dict[str, Any]:
        """As the engine's JSON options (see `from_options`)."""
        return {**dataclasses.asdict(self), "model": str(self.model)}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> CoreSettings:
        fields = {**options, "model": Path(options["model"])}
        for name in ("initial_peers", "host_maddrs"):  # (JSON made the tuples lists)
            fields[name] = tuple(options[name])
        return cls(**fields)


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
class Generated:
    result: GenerationResult
    # (peer_id, start, end) -> tokens, over all generations of the job
    spans: dict[tuple[str, int, int], int]
    checks: list[ServerCheck]


# (max_length, servers to avoid) -> a session to step through
OpenSession = Callable[[int, frozenset[str]], AbstractAsyncContextManager[InferenceSession]]


class GenerationCore:
    def __init__(
        self,
        settings: CoreSettings,
        head: LMHead,
        tokenizer: Any,
        swarm: SwarmClient,
        open_session: OpenSession | None = None,
    ) -> None:
        self.settings = settings
        self.head = head
        # the head as the jobs running at once share it (one matmul for their next tokens)
        self.shared_head = BatchedHead(head)
        self.tokenizer = tokenizer
        self.swarm = swarm
        # an inference session over `swarm` (tests run the blocks in-process instead)
        self.open_session: OpenSession = open_session or (
            lambda max_length, avoid: InferenceSession(swarm, max_length, avoid)
        )
        self.model = offered_model(settings.model_name, head, settings.max_context)
        self.rng = random.Random(settings.seed)
        self.stats = CheckStats()
        # sessions kept for their requester's next turn (`--session-keep`)
        self.kept = KeptSessions(settings.session_keep, settings.max_sessions)
        # jobs generating now
        self._active = 0

    @classmethod
    async def create(cls, settings: CoreSettings) -> GenerationCore:
        import asyncio

        from transformers import AutoTokenizer

        head = await asyncio.to_thread(LMHead.load, settings.model, None, settings.threads)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(settings.model))
        swarm = await SwarmClient.create(
            SwarmClientConfig(
                model_name=settings.model_name,
                initial_peers=settings.initial_peers,
                num_blocks=head.num_blocks,
                host_maddrs=settings.host_maddrs,
            )
        )
        if not await swarm.records():
            others = await swarm.other_models()
            if others:  # servers may still come; a different name is the likelier cause
                missing = MissingBlocks(settings.model_name, [(0, head.num_blocks)], others)
                log.warning("%s", missing)
        return cls(settings, head, tokenizer, swarm)

    async def aclose(self) -> None:
        await self.kept.aclose()
        await self.swarm.aclose()

    def prompt_ids(self, params: TextParams) -> list[int]:
        if params.messages is not None:
            try:
                tools, choice = tools_of(params)
            except ValueError as exc:
                raise InvalidGenerationInput("tools", str(exc)) from None
            messages = [m.model_dump() for m in params.messages]
            text = render_chat(self.tokenizer, messages, tools, choice)
            # a chat template writes its own special tokens
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(params.prompt or "")["input_ids"]
        return [int(i) for i in ids]

    async def run(
        self, params: TextParams, on_text: OnText, requester: str | None = None
    ) -> Generated:
        """Generate a text job's answer; PromptTooLong if it cannot fit the context.
        `requester` (the coordinator's opaque tag of who asked) lets the job reuse that
        requester's kept session (`worker.llm.gateway.kept`)."""
        prompt_ids = self.prompt_ids(params)
        if params.max_context_length is not None:
            # KoboldAI's max_context_length: the prompt keeps its last tokens
            budget = min(params.max_context_length, self.model.max_context) - params.max_tokens
            if budget >= 1:
                bos = getattr(self.tokenizer, "bos_token_id", None)
                prompt_ids = fit_context(prompt_ids, budget, bos)
        if len(prompt_ids) + params.max_tokens > self.model.max_context:
            raise PromptTooLong(
                f"the prompt is {len(prompt_ids)} tokens; with max_tokens {params.max_tokens} "
                f"it exceeds the {self.model.max_context}-token context of {self.model.name}"
            )
        generated = await self.generate(
            prompt_ids, params.max_tokens, sampling_params(params), on_text, requester
        )
        text = format_output(
            generated.result.text,
            params.prompt or "",
            trim_incomplete=params.frmttriminc,
            remove_blank_lines=params.frmtrmblln,
            remove_special=params.frmtrmspch,
            add_space=params.frmtadsnsp,
        )
        if text != generated.result.text:
            generated.result = dataclasses.replace(generated.result, text=text)
        return generated

    async def generate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        on_text: OnText,
        requester: str | None = None,
    ) -> Generated:
        """Generate through the swarm, spot-check the servers (`check_rate` of the jobs) and
        generate again without any server found wrong that the answer went through.
        SwarmStepFailed if every generation went through a wrong server. With a
        `requester`, a session it kept may carry the prompt's start, and the job's session
        is kept for its next turn."""
        self._active += 1
        try:
            return await self._generate(prompt_ids, max_tokens, sampling, on_text, requester)
        finally:
            self._active -= 1

    async def _generate(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        on_text: OnText,
        requester: str | None,
    ) -> Generated:
        avoid: set[str] = set()
        spans: dict[tuple[str, int, int], int] = {}
        checks: list[ServerCheck] = []
        checked = caught = False
        self.stats.jobs += 1
        for generation in range(MAX_GENERATIONS):
            max_length = len(prompt_ids) + max_tokens
            # (a redo starts afresh: the kept session may hold a wrong server's answers)
            session, close, held = await self._open(
                prompt_ids, max_length, frozenset(avoid), requester if generation == 0 else None
            )
            before = {(u.peer_id, u.start, u.end): u.tokens for u in session.usage}
            # a kept session's servers computed the held tokens for an earlier job and kept
            # them since: the report counts them for this job too, as if prefilled again
            # (the coordinator wants every block to cover the whole prompt; the requester
            # pays what a fresh session costs, and the servers are paid for holding it)
            for hop in session.route if held else ():
                key = (hop.peer_id, hop.start, hop.end)
                spans[key] = spans.get(key, 0) + held
            try:
                result = await generate(
                    self.shared_head,
                    _after(held, session),
                    torch.tensor([prompt_ids]),
                    sampling,
                    self.tokenizer,
                    # a redo's text replaces the streamed text when the result is submitted
                    on_text if generation == 0 else None,
                    self._speculation(session),
                )
            except BaseException:
                await close()
                raise
            for usage in session.usage:
                key = (usage.peer_id, usage.start, usage.end)
                tokens = usage.tokens - before.get(key, 0)
                spans[key] = spans.get(key, 0) + tokens
                self.stats.served_block_tokens += tokens * (usage.end - usage.start)
            if self.rng.random() >= self.settings.check_rate:
                await self._keep(requester, prompt_ids, result, session, close)
                return Generated(result, spans, checks)
            if not checked:
                checked = True
                self.stats.checked_jobs += 1
            try:
                found = await self._check(session)
            except BaseException:
                await close()
                raise
            checks += found
            wrong = {check.peer_id for check in found if check.verdict == "wrong"}
            used = {states.hop.peer_id for states in session.served}
            if wrong and not caught:
                caught = True
                self.stats.caught_jobs += 1
            if not wrong & used:
                await self._keep(requester, prompt_ids, result, session, close)
                return Generated(result, spans, checks)
            await close()
            log.warning("redoing a job without the servers found wrong: %s", sorted(wrong))
            avoid |= wrong
        raise SwarmStepFailed(
            f"servers found wrong in each of {MAX_GENERATIONS} generations of this job"
        )

    def _speculation(self, session: InferenceSession) -> Speculation | None:
        tokens = self.settings.draft_tokens
        if tokens == 0:
            return None
        return Speculation(session.step, DraftSettings(max_draft=tokens, start=min(4, tokens)))

    async def _open(
        self, prompt_ids: list[int], max_length: int, avoid: frozenset[str], requester: str | None
    ) -> tuple[InferenceSession, Close, int]:
        """A session for a job, its closer, and how many of the prompt's tokens it holds:
        the requester's kept session if one holds the prompt's start (and its servers
        still have it and room for the rest), else a new one."""
        taken = await self.kept.take(requester, prompt_ids)
        if taken is not None:
            session, close, held = taken
            usable = not any(self.swarm.is_banned(hop.peer_id) for hop in session.route)
            if usable and await session.extend(max_length):
                self.kept.stats.reused += 1
                self.kept.stats.reused_tokens += held
                self.kept.stats.prefilled.append(len(prompt_ids) - held)
                log.info(
                    "reusing a kept session: it holds %d of %d prompt tokens", held, len(prompt_ids)
                )
                return session, close, held
            self.kept.stats.fallbacks += 1
            log.info("a kept session could not be reused (dropped, full or banned); a new one")
            await close()
        # kept sessions use only idle slots: running jobs (this one too) come first
        await self.kept.make_room(self.settings.max_sessions - self._active)
        stack = contextlib.AsyncExitStack()
        session = await stack.enter_async_context(self.open_session(max_length, avoid))
        self.kept.stats.prefilled.append(len(prompt_ids))
        return session, stack.aclose, 0

    async def _keep(
        self,
        requester: str | None,
        prompt_ids: list[int],
        result: GenerationResult,
        session: InferenceSession,
        close: Close,
    ) -> None:
        # the servers hold the prompt and every token but the last (picked, never sent)
        held = [*prompt_ids, *result.token_ids[:-1]]
        await self.kept.put(requester, held, session, close)

    async def _check(self, session: InferenceSession) -> list[ServerCheck]:
        """Spot-check every server of a finished session; ban the ones found wrong."""
        found: list[ServerCheck] = []
        for states in session.served:
            outcome = await check_hop(self.swarm, states, self.rng, self.settings.check_tolerance)
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
                    self.settings.check_ban_seconds,
                )
                self.swarm.ban(check.peer_id, self.settings.check_ban_seconds)
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


def _after(held: int, session: InferenceSession) -> Step:
    """`session.step`, except that its first call (the whole prompt) sends only the
    positions from `held` on, cutting a kept session back to them first: the session's
    servers hold those already (and maybe more, which the cut drops)."""
    first = True

    async def stepped(hidden: torch.Tensor) -> torch.Tensor:
        nonlocal first
        if first:
            first = False
            return await session.step(hidden[:, held:], start_position=held)
        return await session.step(hidden)

    return stepped if held else session.step


def sampling_params(params: TextParams) -> SamplingParams:
    """How the gateway samples a job (`singleline` ends the text at its first newline)."""
    return SamplingParams(
        max_new_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        stop=(*params.stop, "\n") if params.singleline else tuple(params.stop),
        seed=params.seed,
        rep_pen_range=params.rep_pen_range,
        rep_pen_slope=params.rep_pen_slope,
        top_a=params.top_a,
        tfs=params.tfs,
        typical=params.typical,
        min_p=params.min_p,
        smoothing_factor=params.smoothing_factor,
        dynatemp_range=params.dynatemp_range,
        dynatemp_exponent=params.dynatemp_exponent,
        sampler_order=None if params.sampler_order is None else tuple(params.sampler_order),
        ban_eos=params.use_default_badwordsids,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        grammar=None if params.response_format is None else params.response_format.grammar(),
        logprobs=params.top_logprobs if params.logprobs else None,
    )


def offered_model(model_name: str, head: LMHead, max_context: int | None) -> TextModel:
    """The model and sizes this gateway offers; the coordinator serves it only if its
    catalog lists exactly these."""
    return TextModel(
        name=model_name,
        blocks=head.num_blocks,
        parameters=head.param_count,
        max_context=max_context or _max_context(head),
    )


def _max_context(head: LMHead) -> int:
    with contextlib.suppress(AttributeError, TypeError):
        return int(head.config.max_position_embeddings)
    return 2048
