"""Text (LLM) jobs in the store: models offered, peer links, queue, streamed text, settlement.

Text jobs are rows of the `jobs` table (`kind='text'`) on the one lifecycle
(coordinator.jobs.lifecycle): queue, lease, requeue, fail, refund, cancel and reap are the
same code as for images. What is text-only lives here: when gateways last offered each
catalog model (coordinator.economy.text_models holds the models and their sizes), the
block servers' hivemind peer ids, the text streamed so far (capped by `max_tokens`), and
the settlement that charges the requester for the work done and pays every block server's
owner from the gateway's signed report, in one transaction.

The settlement checks the gateway's report and pays from it
(coordinator.economy.text_settlement).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.accounts import Account
from coordinator.db import nonces
from coordinator.db.request_keys import Idempotent
from coordinator.db.schema import jobs, text_models, text_outputs, worker_peers, workers
from coordinator.db.tx import now
from coordinator.economy import horde_text, payments, text_settlement
from coordinator.economy.text_settlement import Settlement
from coordinator.errors import BadRequest, Conflict
from coordinator.jobs.lifecycle import Lifecycle, PollNote
from coordinator.workers import Worker
from protocol.cost import text_cost
from protocol.signing import params_hash
from protocol.text import (
    MAX_CHARS_PER_TOKEN,
    TextModel,
    TextParams,
    TextResultSubmit,
    TokenLogprob,
    text_cap,
    token_bound,
)

__all__ = ["HORDE_SECONDS_PER_TOKEN", "TextJob", "TextJobs", "reserve_cost"]


@dataclass(frozen=True)
class TextJob:
    id: str
    account_id: int
    state: str
    model: str
    params: TextParams
    params_hash: str
    cost: int
    created_at: float
    worker_id: str | None
    lease_seconds: float
    lease_deadline: float | None
    attempts: int
    error: str | None
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    charged: int | None
    # made through AI Horde's /api/v2 (visible to whoever holds its id, as there)
    horde: bool = False
    # with params.logprobs, once done (README: Logprobs)
    logprobs: list[TokenLogprob] | None = None
    # an AI Horde text worker's pay for it is held until then (None: nothing held)
    held_until: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


_LOGPROBS = TypeAdapter(list[TokenLogprob])


def _text_query() -> Any:
    return select(
        jobs,
        text_outputs.c.text,
        text_outputs.c.finish_reason,
        text_outputs.c.prompt_tokens,
        text_outputs.c.completion_tokens,
        text_outputs.c.charged,
        text_outputs.c.logprobs,
    ).select_from(jobs.outerjoin(text_outputs, text_outputs.c.job_id == jobs.c.id))


def _text_job(row: Row[Any]) -> TextJob:
    return TextJob(
        id=row.id,
        account_id=row.account_id,
        state=row.state,
        model=row.model,
        params=TextParams.model_validate_json(row.params),
        params_hash=row.params_hash,
        cost=row.cost,
        created_at=row.created_at,
        worker_id=row.worker_id,
        lease_seconds=row.lease_seconds,
        lease_deadline=row.lease_deadline,
        attempts=row.attempts,
        error=row.error,
        text=row.text or "",
        finish_reason=row.finish_reason,
        prompt_tokens=row.prompt_tokens or 0,
        completion_tokens=row.completion_tokens or 0,
        charged=row.charged,
        horde=row.horde is not None,
        logprobs=None if row.logprobs is None else _LOGPROBS.validate_json(row.logprobs),
        held_until=row.held_until,
    )


# --- models and peers -------------------------------------------------------------------


# --- jobs -------------------------------------------------------------------------------


def reserve_cost(params: TextParams, model: TextModel) -> int:
    """Kudos reserved at submit: every token the job could process, through every block
    plus the gateway's embeddings and head (counted as one more block)."""
    return text_cost(token_bound(params), model.blocks + 1, model.parameters)


async def _start_text(conn: AsyncConnection, row: Row[Any]) -> None:
    """A leased text job starts its text afresh (a requeued one streamed some before)."""
    await conn.execute(text_outputs.delete().where(text_outputs.c.job_id == row.id))
    await conn.execute(
        text_outputs.insert().values(
            job_id=row.id, model=row.model, text="", prompt_tokens=0, completion_tokens=0
        )
    )


# an AI Horde text worker streams nothing, so nothing extends its lease: it gets this long
# for every token it may generate, beyond the lease's base
HORDE_SECONDS_PER_TOKEN = 0.5


async def _start_unsigned(conn: AsyncConnection, row: Row[Any]) -> None:
    """`_start_text`, and the lease of an AI Horde text worker made long enough for the
    whole text (HORDE_SECONDS_PER_TOKEN)."""
    await _start_text(conn, row)
    deadline = float(row.lease_deadline) + int(row.max_tokens) * HORDE_SECONDS_PER_TOKEN
    await conn.execute(update(jobs).where(jobs.c.id == row.id).values(lease_deadline=deadline))


async def _text_at(conn: AsyncConnection, job_id: str, offset: int, size: int) -> str:
    """`size` characters of the job's text from `offset` (SQL counts from 1)."""
    query = select(func.substr(text_outputs.c.text, offset + 1, size))
    return str((await conn.execute(query.where(text_outputs.c.job_id == job_id))).scalar_one())


def _too_long(length: int, max_tokens: int) -> BadRequest:
    cap = text_cap(max_tokens)
    return BadRequest(
        f"the text of a job with max_tokens {max_tokens} may hold at most {cap} characters "
        f"(max_tokens x {MAX_CHARS_PER_TOKEN}); this delta would make it {length}",
        [("text", f"the whole text must be at most {cap} characters")],
    )


class TextJobs(Lifecycle):
    """Text jobs: the lifecycle plus the models offered, block servers' peer links,
    streamed text and settlement."""

    kind = "text"

    async def offer_models(self, models: Sequence[TextModel]) -> None:
        """Remember that a gateway offered these catalog models now (upsert of last_seen; the
        sizes written are the catalog's: coordinator.economy.text_models.check_offer)."""
        async with self._db.begin() as conn:
            for model in models:
                values = {
                    "blocks": model.blocks,
                    "parameters": model.parameters,
                    "max_context": model.max_context,
                    "last_seen": now(conn),
                }
                changed = await conn.execute(
                    update(text_models).where(text_models.c.name == model.name).values(values)
                )
                if changed.rowcount == 0:
                    await conn.execute(text_models.insert().values(name=model.name, **values))

    async def served_models(self, max_age: float, *, horde_workers: bool = False) -> list[str]:
        """Names of the models a gateway offered within `max_age` seconds, most recent first;
        with `horde_workers`, then those AI Horde text workers popped for in that time (they
        serve only jobs made through /api/v2 without trusted_workers)."""
        since = self._db.now() - max_age
        query = (
            select(text_models.c.name)
            .where(text_models.c.last_seen >= since)
            .order_by(text_models.c.last_seen.desc(), text_models.c.name)
        )
        bridges = select(workers.c.models).where(
            (workers.c.protocol == "horde")
            & (workers.c.kind == "text")
            & (workers.c.last_seen >= since)
            & workers.c.models.is_not(None)
        )
        async with self._db.begin() as conn:
            names = list((await conn.execute(query)).scalars())
            if horde_workers:
                for offered in (await conn.execute(bridges)).scalars():
                    names += [n for n in json.loads(offered) if n not in names]
        return names

    async def link_peer(self, worker: Worker, peer_id: str, nonce: str) -> None:
        """Link a hivemind peer id to `worker`, which proved it holds the peer id's libp2p key
        by signing `nonce` (used up here). The proof is the last word: a link made earlier
        by another worker (without the key, before proofs existed) moves to this one."""
        async with self._db.begin() as conn:
            await nonces.consume(conn, nonce, "peer")
            row = (
                await conn.execute(select(worker_peers).where(worker_peers.c.peer_id == peer_id))
            ).first()
            if row is None:
                await conn.execute(
                    worker_peers.insert().values(
                        peer_id=peer_id, worker_id=worker.id, linked_at=now(conn)
                    )
                )
            elif row.worker_id != worker.id:
                await conn.execute(
                    update(worker_peers)
                    .where(worker_peers.c.peer_id == peer_id)
                    .values(worker_id=worker.id, linked_at=now(conn))
                )

    def _lease_seconds(self, params: TextParams) -> float:
        config = self._db.config
        if config.lease_timeout is not None:
            return config.lease_timeout
        # the gateway extends the lease with every piece of text it streams
        return config.lease_base_seconds

    async def create(
        self,
        account: Account,
        params: TextParams,
        model: TextModel,
        horde: dict[str, object] | None = None,
        idempotent: Idempotent | None = None,
        *,
        signed_only: bool = False,
    ) -> TextJob:
        """Queue a text job for `model` and reserve its upper-bound cost (once per `idempotent`
        key: Lifecycle._queue); `horde`: the /api/v2 request's options, for jobs made there.
        Only a job made through /api/v2 without `signed_only` (AI Horde's trusted_workers)
        may go to an AI Horde text worker (`pop_unsigned`)."""
        row = await self._queue(
            account,
            reserve_cost(params, model),
            {
                "kind": "text",
                "params": params.model_dump_json(),
                "params_hash": params_hash(params),
                "model": model.name,
                "pixels": 0,
                "steps": 0,
                "n": 1,
                "lease_seconds": self._lease_seconds(params),
                "steps_total": 0,
                "max_tokens": params.max_tokens,
                "horde": None if horde is None else json.dumps(horde),
                "signed_only": 1 if signed_only or horde is None else 0,
            },
            "lower max_tokens or shorten the prompt, or earn kudos by running a worker",
            idempotent,
        )
        job = await self.get(row.id)
        assert job is not None
        return job

    async def get(self, job_id: str) -> TextJob | None:
        query = _text_query().where((jobs.c.id == job_id) & (jobs.c.kind == "text"))
        async with self._db.begin() as conn:
            row = (await conn.execute(query)).first()
        return _text_job(row) if row else None

    async def pop(self, worker: Worker, models: Sequence[str]) -> TextJob | None:
        """Lease the best queued text job for one of `models` (see Lifecycle._pop)."""
        fits = (jobs.c.kind == "text") & jobs.c.model.in_(list(models))
        leased = await self._pop(worker, fits, take_checks=True, on_lease=_start_text)
        if leased is None:
            return None
        return await self.get(leased.id)

    async def pop_unsigned(
        self,
        worker: Worker,
        models: Sequence[str],
        max_length: int,
        max_context: int,
        poll: PollNote | None = None,
    ) -> TextJob | None:
        """For an AI Horde text worker: lease the best queued job for one of `models` made
        through /api/v2 without trusted_workers (`create`), that asks for at most
        `max_length` tokens and leaves room for a prompt in `max_context`."""
        fits = (
            (jobs.c.kind == "text")
            & jobs.c.model.in_(list(models))
            & (jobs.c.signed_only == 0)
            & jobs.c.horde.is_not(None)
            & (jobs.c.max_tokens <= max_length)
            & (jobs.c.max_tokens < max_context)
        )
        leased = await self._pop(worker, fits, on_lease=_start_unsigned, poll=poll)
        return None if leased is None else await self.get(leased.id)

    async def finish_unsigned(
        self,
        worker: Worker,
        job: TextJob,
        text: str,
        finish_reason: str,
        tokens: tuple[int, int],
        price: int,
    ) -> int:
        """An AI Horde text worker's text: done, the unused reservation refunded and `price`
        held for dispute (coordinator.economy.horde_text), in one transaction; the kudos held.
        `tokens`: the (prompt, completion) tokens estimated."""
        async with self._db.begin() as conn:
            row = await self._finish(conn, worker, job.id)
            held = await horde_text.hold(conn, self._db.config, worker.id, row, price)
            await conn.execute(
                update(text_outputs)
                .where(text_outputs.c.job_id == job.id)
                .values(
                    text=text,
                    finish_reason=finish_reason,
                    prompt_tokens=tokens[0],
                    completion_tokens=tokens[1],
                    charged=price,
                )
            )
        self.ranking.changed("text")
        return held

    async def give_back(self, worker: Worker, job_id: str, reason: str) -> TextJob:
        """An AI Horde text worker reports it could not do the job: requeued (or failed and
        refunded when out of attempts); it counts toward the worker's --faulted-run."""
        await self._fail(worker, job_id, reason, retry=True, counts=True)
        job = await self.get(job_id)
        assert job is not None
        return job

    async def dispute(self, job_id: str, why: str) -> int:
        """The requester disputes an AI Horde text worker's text while its pay is held
        (payments.dispute): the kudos refunded; the text is deleted (whoever disputes does
        not keep it). Conflict when nothing is held for it (any more)."""
        async with self._db.begin() as conn:
            row = (
                await conn.execute(
                    select(jobs)
                    .where((jobs.c.id == job_id) & (jobs.c.kind == "text"))
                    .with_for_update()
                )
            ).first()
            if row is None or row.held_until is None:
                raise Conflict(
                    f"nothing is held for text job {job_id}: only texts of AI Horde workers "
                    "(unsigned) can be disputed, and only until their pay is released"
                )
            refunded = await payments.dispute(conn, self._db.config, row, why)
            await conn.execute(
                update(text_outputs).where(text_outputs.c.job_id == job_id).values(text="")
            )
        return refunded

    async def append_text(
        self, worker: Worker, job_id: str, offset: int, text: str
    ) -> tuple[int, float]:
        """Append streamed text at `offset` and extend the lease; returns (length, deadline).

        Sending the same piece twice (a retry) is harmless; a gap or a different text is a 409;
        text past the job's cap (`text_cap(max_tokens)`) is a 400 and extends nothing. The text
        is appended in SQL, never read back whole.
        """
        stored = text_outputs.c.text
        mine = text_outputs.c.job_id == job_id
        async with self._db.begin() as conn:
            leased = await self._extend(conn, worker, job_id)
            # (SQLite and PostgreSQL both count characters: code points, as Python does)
            length = (await conn.execute(select(func.length(stored)).where(mine))).scalar_one()
            if offset == length:
                max_tokens = int(leased.max_tokens)
                if length + len(text) > text_cap(max_tokens):
                    raise _too_long(length + len(text), max_tokens)
                await conn.execute(update(text_outputs).where(mine).values(text=stored + text))
                length += len(text)
            elif offset > length or await _text_at(conn, job_id, offset, len(text)) != text:
                raise Conflict(
                    f"text at offset {offset} does not continue the {length} characters "
                    "received; resend from the returned length",
                    [("offset", f"must be {length}")],
                )
        return int(length), float(leased.lease_deadline)

    async def complete(
        self, worker: Worker, job: TextJob, result: TextResultSubmit, model: TextModel
    ) -> Settlement:
        """Finish the job: store the text, charge the work done, pay the block servers' owners
        (by block-tokens served) and the gateway's owner, refund the rest, apply the gateway's
        spot checks of its servers and maybe schedule a check of the gateway -- one
        transaction, one ledger entry per movement (refund, then each worker's pay from escrow).

        A verification job (a trusted gateway re-running another's job) charges nobody: its
        workers are paid from the grants account, at most what the checked job reserved, and
        its text decides the check (coordinator.economy.text_checks)."""
        text_settlement.check_report(job.params, result, model)
        async with self._db.begin() as conn:
            row = await self._finish(conn, worker, job.id)
            settled = await text_settlement.settle(
                conn, self._db.config, worker.id, worker.account_id, row, result, model
            )
            await conn.execute(
                update(text_outputs)
                .where(text_outputs.c.job_id == job.id)
                .values(
                    text=result.text,
                    finish_reason=result.finish_reason,
                    prompt_tokens=result.prompt_tokens,
                    completion_tokens=result.completion_tokens,
                    spans=json.dumps([s.model_dump() for s in result.spans]),
                    charged=settled.charged,
                    signature=result.signature,
                    logprobs=None
                    if result.logprobs is None
                    else _LOGPROBS.dump_json(result.logprobs).decode(),
                )
            )
        self.ranking.changed("text")  # the throughput behind ETAs changed
        return settled

    async def fail(self, worker: Worker, job_id: str, reason: str, retry: bool) -> TextJob:
        """Give the job back to the queue, or (no retry, or out of attempts) fail and refund.
        It does not count toward the gateway's --faulted-run: a gateway's failure is most
        often one of its block servers' (checked separately, coordinator.economy.text_checks)."""
        await self._fail(worker, job_id, reason, retry=retry, counts=False)
        job = await self.get(job_id)
        assert job is not None
        return job
