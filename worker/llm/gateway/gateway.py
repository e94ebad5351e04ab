"""The text gateway: pops text jobs, has its confined engine generate them through the swarm,
streams the text back and reports which block server served which blocks for how many
tokens, with the engine's spot checks of those servers. It serves up to `max_sessions`
jobs at once: each its own pop, lease, stream and result report, all generated side by
side in the one engine (`worker.llm.gateway.multiplex`), so the block servers batch them.

The gateway is two processes. This one holds the coordinator link: the API key and the
identity key that signs results. The engine (`worker.llm.gateway.engine`, started through
`sandbox.Sandbox`) does everything that touches what block servers send: embeddings, the
swarm client, the LM head, sampling and spot checks (`worker.llm.gateway.core`). It keeps
the network, for the swarm, but holds no credentials and reads no file but the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from protocol.engine import (
    TEXT_CONFIGURE,
    TEXT_INFO,
    TEXT_REFRESH,
    TEXT_STATS,
    CheckRate,
    NoMessage,
)
from protocol.signing import params_hash
from protocol.text import LeasedTextJob, TextModel
from sandbox import Sandbox, SandboxPolicy
from sandbox.errors import EngineCrashed, EngineFailed, EngineStartFailed, EngineTimedOut
from worker.common.donor import build_gate
from worker.common.link import CoordinatorLink, retrying
from worker.common.sandboxing import report_confinement
from worker.common.service import Drain, serve_jobs
from worker.errors import (
    CoordinatorRejected,
    CoordinatorUnavailable,
    LeaseLost,
    ModelError,
)
from worker.llm.gateway.config import GatewayConfig
from worker.llm.gateway.core import CoreSettings
from worker.llm.gateway.multiplex import EngineJobs

__all__ = ["ENGINE", "TextGateway", "engine_policy"]

log = logging.getLogger(__name__)

ENGINE = "worker.llm.gateway.engine:GenerationEngine"
# checks one result report carries (protocol.text.TextResultSubmit)
MAX_CHECKS = 64
# engine errors after which the job cannot be served here, whatever the retry
_NOT_HERE = frozenset({"MissingBlocks", "PromptTooLong", "InvalidGenerationInput"})


class _TextSender:
    """Streams text to the coordinator without slowing generation: at most one post per
    `interval` seconds and one in flight; text made meanwhile goes in the next post."""

    def __init__(self, link: CoordinatorLink, job_id: str, interval: Callable[[], float]) -> None:
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
        if self.lost is not None:
            return  # the job was taken back: nobody reads this text any more
        self.pending += text
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        loop = asyncio.get_running_loop()
        while self.pending and self.lost is None:
            wait = self._last_post + self._interval() - loop.time()
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


def engine_policy(config: GatewayConfig) -> SandboxPolicy:
    """The engine's confinement: the network (for the swarm), the model read-only, no keys."""
    return SandboxPolicy(
        confine=not config.unsandboxed,
        network=True,
        read_only=(config.model.resolve(),),
        packages=("sandbox", "protocol", "worker"),
        # loading the head and joining the swarm; a generation has its own deadline below
        start_timeout=600.0,
        job_timeout=config.job_timeout,
        extra_env={"HF_HUB_OFFLINE": "1"},
    )


class TextGateway:
    def __init__(
        self, config: GatewayConfig, link: CoordinatorLink, engine: Sandbox, model: TextModel
    ) -> None:
        self.config = config
        self.link = link
        self.engine = engine
        self.model = model
        self.jobs = EngineJobs(engine)
        self.jobs_done = 0
        # run_until_signalled starts it on the first SIGINT/SIGTERM: the job in hand
        # finishes, a second signal gives it back
        self.drain = Drain()

    @classmethod
    async def create(
        cls, config: GatewayConfig, link: CoordinatorLink, seed: int | None = None
    ) -> TextGateway:
        """Start the engine (it loads the head and joins the swarm). `seed` fixes which jobs
        get spot-checked (benchmarks). ModelError if the engine cannot start."""
        settings = CoreSettings(
            model=config.model.resolve(),
            model_name=config.model_name,
            initial_peers=config.initial_peers,
            host_maddrs=config.host_maddrs,
            threads=config.threads,
            max_context=config.max_context,
            check_rate=config.check_rate,
            check_tolerance=config.check_tolerance,
            check_ban_seconds=config.check_ban_seconds,
            draft_tokens=config.draft_tokens,
            session_keep=config.session_keep,
            max_sessions=config.max_sessions,
            seed=seed,
        )
        try:
            engine = await Sandbox.create(ENGINE, settings.to_options(), engine_policy(config))
        except EngineStartFailed as exc:
            raise ModelError(f"the gateway's engine could not start: {exc}") from exc
        try:
            model = (await engine.run(TEXT_INFO, NoMessage())).data
        except BaseException:
            await engine.aclose()
            raise
        return cls(config, link, engine, model)

    async def aclose(self) -> None:
        await self.jobs.aclose()
        await self.engine.aclose()

    async def stats(self) -> dict[str, Any]:
        """The engine's spot-check statistics (core.CheckStats) and the peers it bans, as
        `protocol.engine.EngineStats` in JSON."""
        return (await self.engine.run(TEXT_STATS, NoMessage())).data.model_dump(mode="json")

    async def set_check_rate(self, rate: float) -> None:
        """Change the share of jobs spot-checked from now on (tests, benchmarks)."""
        await self.engine.run(TEXT_CONFIGURE, CheckRate(check_rate=rate))

    async def refresh_records(self) -> list[str]:
        """Have the engine re-read the swarm's records; the peer ids it found."""
        return (await self.engine.run(TEXT_REFRESH, NoMessage())).data.records

    async def run(self) -> None:
        """Serve until cancelled. CoordinatorRejected (400) if the coordinator refuses the
        model: it is not in its catalog, or has other sizes there (the message says which)."""
        registered = await retrying("register", self.link.register)
        await report_confinement(self.link, "swarm-gateway", self.config.unsandboxed)
        print(
            f"idlegrid text gateway {self.config.name} ready: model {self.model.name} "
            f"({self.model.blocks} blocks, {self.model.parameters} parameters), "
            f"worker id {registered.worker_id}",
            flush=True,
        )
        gate = build_gate(self.config.donor)
        # one pop-and-serve loop per chat served at once
        async with asyncio.TaskGroup() as slots:
            for slot in range(self.config.max_sessions):
                slots.create_task(
                    serve_jobs(
                        self.link,
                        lambda: self.link.pop_text([self.model], self.config.pop_wait),
                        self.serve,
                        gate=gate,
                        drain=self.drain,
                    ),
                    name=f"slot {slot}",
                )

    async def serve(self, job: LeasedTextJob) -> None:
        if params_hash(job.params) != job.params_hash:
            await self._give_back(job, "params hash mismatch: coordinator and gateway differ")
            return
        # the posts of all running jobs together stay near one per `stream_interval`
        # (within the coordinator's per-worker rate of streamed text)
        sender = _TextSender(
            self.link, job.id, lambda: self.config.stream_interval * max(1, self.jobs.running)
        )

        started = time.monotonic()
        try:
            # (EngineMisbehaved, a malformed message from the engine, is an EngineCrashed)
            async with asyncio.timeout(self.config.job_timeout):
                result = await self.jobs.generate(job.id, job.params, sender.add, job.requester)
        except TimeoutError:
            sender.cancel()
            log.error("text job %s ran past %gs; given back", job.id, self.config.job_timeout)
            await self._give_back(job, f"EngineTimedOut: ran past {self.config.job_timeout:g}s")
            return
        except EngineFailed as exc:
            sender.cancel()
            retry = exc.error_type not in _NOT_HERE
            log.error("text job %s failed in the engine: %s", job.id, exc)
            await self._give_back(job, f"{exc.error_type}: {exc.message}", retry=retry)
            return
        except (EngineCrashed, EngineTimedOut) as exc:
            sender.cancel()
            log.error("the gateway's engine failed on text job %s: %s", job.id, exc)
            await self._give_back(job, f"{type(exc).__name__}: {exc}")
            return
        except asyncio.CancelledError:
            sender.cancel()
            await asyncio.shield(self._give_back(job, "gateway shutting down"))
            raise
        if sender.lost is not None:
            log.warning("text job %s was taken back while generating: %s", job.id, sender.lost)
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
                    [span.model_dump() for span in result.spans],
                    [check.model_dump() for check in result.checks[:MAX_CHECKS]],
                    None
                    if result.logprobs is None
                    else [entry.model_dump() for entry in result.logprobs],
                ),
            )
        except LeaseLost as exc:
            log.warning("text job %s was taken back before we finished: %s", job.id, exc)
            return
        self.jobs_done += 1
        log.info(
            "text job %s: %d tokens in %.2fs (%.1f tok/s, first after %.0f ms), charged %d",
            job.id,
            result.completion_tokens,
            time.monotonic() - started,
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
