"""Text (LLM) jobs in the store: models offered, peer links, queue, streamed text, settlement.

Text jobs are rows of the `jobs` table (`kind='text'`) on the one lifecycle
(coordinator.jobs.lifecycle): queue, lease, requeue, fail, refund, cancel and reap are the
same code as for images. What is text-only lives here: the models
gateways offer, the block servers' hivemind peer ids, the text streamed so far, and the
settlement that charges the requester for the work done and pays every block server's
owner from the gateway's signed report -- one ledger entry, one transaction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.accounts import Account
from coordinator.db.database import ESCROW
from coordinator.db.ledger import post_entry
from coordinator.db.schema import jobs, text_models, text_outputs, worker_peers, workers
from coordinator.db.tx import now
from coordinator.economy import trust
from coordinator.errors import BadRequest, Conflict
from coordinator.jobs.lifecycle import Lifecycle
from coordinator.workers import Worker
from protocol.cost import text_cost, text_work
from protocol.signing import params_hash
from protocol.text import TextModel, TextParams, TextResultSubmit, token_bound

__all__ = [
    "Settlement",
    "TextJob",
    "append_text",
    "complete_text_job",
    "create_text_job",
    "fail_text_job",
    "get_text_job",
    "known_models",
    "link_peer",
    "offer_models",
    "pop_text_job",
    "split_kudos",
    "text_queue_position",
]

# a block server may process a token more than once (history replayed after a failover)
MAX_REPLAYS_PER_TOKEN = 4


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

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Settlement:
    charged: int
    refunded: int
    paid: dict[int, int]  # account id -> kudos


def _text_query() -> Any:
    return select(
        jobs,
        text_outputs.c.text,
        text_outputs.c.finish_reason,
        text_outputs.c.prompt_tokens,
        text_outputs.c.completion_tokens,
        text_outputs.c.charged,
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
    )


def split_kudos(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainder; ties to the earliest)."""
    if total < 0 or any(w < 0 for w in weights):
        raise ValueError("total and weights must not be negative")
    whole = sum(weights)
    if not weights or whole == 0:
        return [0] * len(weights)
    exact = [total * w / whole for w in weights]
    shares = [math.floor(x) for x in exact]
    left = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[:left]:
        shares[i] += 1
    return shares


# --- models and peers -------------------------------------------------------------------


async def offer_models(store: Lifecycle, models: Sequence[TextModel]) -> None:
    """Remember the models a gateway can run (upsert; refreshes last_seen)."""
    async with store.begin() as conn:
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


async def known_models(store: Lifecycle, max_age: float | None = None) -> list[TextModel]:
    """Models offered by gateways, most recently seen first; only recent ones with max_age."""
    query = select(text_models).order_by(text_models.c.last_seen.desc(), text_models.c.name)
    if max_age is not None:
        query = query.where(text_models.c.last_seen >= store.now() - max_age)
    async with store.begin() as conn:
        rows = (await conn.execute(query)).all()
    return [
        TextModel(name=r.name, blocks=r.blocks, parameters=r.parameters, max_context=r.max_context)
        for r in rows
    ]


async def link_peer(store: Lifecycle, worker: Worker, peer_id: str) -> None:
    """Link a hivemind peer id to the worker whose identity signed it."""
    async with store.begin() as conn:
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
            raise Conflict(
                f"peer id {peer_id} is already linked to another worker; "
                "a block server's hivemind key must not be shared",
                [("peer_id", "is linked to another worker")],
            )


# --- jobs -------------------------------------------------------------------------------


def text_lease_seconds(store: Lifecycle, params: TextParams) -> float:
    config = store.config
    if config.lease_timeout is not None:
        return config.lease_timeout
    # the gateway extends the lease with every piece of text it streams
    return config.lease_base_seconds


def reserve_cost(params: TextParams, model: TextModel) -> int:
    """Kudos reserved at submit: every token the job could process, through every block
    plus the gateway's embeddings and head (counted as one more block)."""
    return text_cost(token_bound(params), model.blocks + 1, model.parameters)


async def create_text_job(
    store: Lifecycle, account: Account, params: TextParams, model: TextModel
) -> TextJob:
    """Queue a text job for `model` and reserve its upper-bound cost."""
    row = await store.queue_job(
        account,
        reserve_cost(params, model),
        {
            "kind": "text",
            "params": params.model_dump_json(),
            "params_hash": params_hash(params),
            "model": model.name,
            "pixels": 0,
            "steps": params.max_tokens,
            "n": 1,
            "lease_seconds": text_lease_seconds(store, params),
            "steps_total": params.max_tokens,
        },
        "lower max_tokens or shorten the prompt, or earn kudos by running a worker",
    )
    job = await get_text_job(store, row.id)
    assert job is not None
    return job


async def get_text_job(store: Lifecycle, job_id: str) -> TextJob | None:
    query = _text_query().where((jobs.c.id == job_id) & (jobs.c.kind == "text"))
    async with store.begin() as conn:
        row = (await conn.execute(query)).first()
    return _text_job(row) if row else None


async def text_queue_position(store: Lifecycle, job_id: str) -> tuple[int | None, float | None]:
    """(queue position, ETA seconds): 0 = next text job to be popped; None once running."""
    return await store.queue_info(job_id)


async def _start_text(conn: AsyncConnection, row: Row[Any]) -> None:
    """A leased text job starts its text afresh (a requeued one streamed some before)."""
    await conn.execute(text_outputs.delete().where(text_outputs.c.job_id == row.id))
    await conn.execute(
        text_outputs.insert().values(
            job_id=row.id, model=row.model, text="", prompt_tokens=0, completion_tokens=0
        )
    )


async def pop_text_job(store: Lifecycle, worker: Worker, models: Sequence[str]) -> TextJob | None:
    """Lease the best queued text job for one of `models` (see Lifecycle.pop)."""
    fits = (jobs.c.kind == "text") & jobs.c.model.in_(list(models))
    leased = await store.pop(worker, fits, on_lease=_start_text)
    if leased is None:
        return None
    return await get_text_job(store, leased.id)


async def append_text(
    store: Lifecycle, worker: Worker, job_id: str, offset: int, text: str
) -> tuple[int, float]:
    """Append streamed text at `offset` and extend the lease; returns (length, deadline).

    Sending the same piece twice (a retry) is harmless; a gap or a different text is a 409.
    """
    async with store.begin() as conn:
        leased = await store.extend(conn, worker, job_id)
        current = (
            await conn.execute(select(text_outputs.c.text).where(text_outputs.c.job_id == job_id))
        ).scalar_one()
        if offset == len(current):
            current += text
            await conn.execute(
                update(text_outputs).where(text_outputs.c.job_id == job_id).values(text=current)
            )
        elif current[offset : offset + len(text)] != text:
            raise Conflict(
                f"text at offset {offset} does not continue the {len(current)} characters "
                "received; resend from the returned length",
                [("offset", f"must be {len(current)}")],
            )
    return len(current), float(leased.lease_deadline)


async def _peer_workers(conn: AsyncConnection, peer_ids: set[str]) -> dict[str, tuple[str, int]]:
    """peer id -> (worker id, owner account id) for the linked ones."""
    if not peer_ids:
        return {}
    query = (
        select(worker_peers.c.peer_id, workers.c.id, workers.c.account_id)
        .select_from(worker_peers.join(workers, workers.c.id == worker_peers.c.worker_id))
        .where(worker_peers.c.peer_id.in_(sorted(peer_ids)))
    )
    return {peer: (wid, int(acc)) for peer, wid, acc in (await conn.execute(query)).all()}


def _check_report(job: TextJob, result: TextResultSubmit, model: TextModel) -> None:
    problems: list[tuple[str, str]] = []
    if result.completion_tokens > job.params.max_tokens:
        problems.append(("completion_tokens", f"must be at most {job.params.max_tokens}"))
    if result.prompt_tokens + result.completion_tokens > token_bound(job.params):
        problems.append(("prompt_tokens", "is more than the prompt can tokenize to"))
    processed = result.prompt_tokens + result.completion_tokens
    for i, span in enumerate(result.spans):
        if span.end > model.blocks:
            problems.append((f"spans[{i}].end", f"model {model.name} has {model.blocks} blocks"))
        if span.tokens > processed * MAX_REPLAYS_PER_TOKEN:
            problems.append((f"spans[{i}].tokens", "is more than the job could process"))
    if problems:
        raise BadRequest(
            "the usage report does not fit the job: " + "; ".join(f"{f} {m}" for f, m in problems),
            problems,
        )


async def complete_text_job(
    store: Lifecycle, worker: Worker, job: TextJob, result: TextResultSubmit, model: TextModel
) -> Settlement:
    """Finish the job: store the text, charge the work done, pay the block servers' owners
    (by block-tokens served) and the gateway's owner, refund the rest -- one transaction,
    one ledger entry per movement (refund, then each worker's pay from escrow)."""
    _check_report(job, result, model)
    async with store.begin() as conn:
        await store.finish(conn, worker, job.id)
        linked = await _peer_workers(conn, {span.peer_id for span in result.spans})
        # block-tokens per paid worker; block servers nobody linked are not paid or charged
        units: dict[tuple[str, int], int] = {}
        for span in result.spans:
            payee = linked.get(span.peer_id)
            if payee is not None:
                units[payee] = units.get(payee, 0) + span.tokens * (span.end - span.start)
        gateway = (worker.id, worker.account_id)
        units[gateway] = units.get(gateway, 0) + result.prompt_tokens + result.completion_tokens
        work = text_work(sum(units.values()), 1, model.parameters)
        charged = min(job.cost, max(1, math.ceil(work)))
        payees = sorted(units)
        shares = split_kudos(charged, [units[p] for p in payees])
        if job.cost > charged:
            await post_entry(
                conn,
                reason="refund",
                key=f"refund:{job.id}",
                job_id=job.id,
                moves=[
                    (store.system_account(ESCROW), charged - job.cost),
                    (job.account_id, job.cost - charged),
                ],
            )
        paid: dict[int, int] = {}
        for (worker_id, account_id), share in zip(payees, shares, strict=True):
            # untrusted workers get part of it held pending verification (economy.trust)
            await trust.pay_worker(
                conn,
                store.config,
                worker_id,
                account_id,
                share,
                job.id,
                f"settle:{job.id}:{worker_id}",
            )
            if share:
                paid[account_id] = paid.get(account_id, 0) + share
        await conn.execute(
            update(text_outputs)
            .where(text_outputs.c.job_id == job.id)
            .values(
                text=result.text,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                spans=json.dumps([s.model_dump() for s in result.spans]),
                charged=charged,
                signature=result.signature,
            )
        )
    store.ranking.changed("text")  # the throughput behind ETAs changed
    return Settlement(charged=charged, refunded=job.cost - charged, paid=paid)


async def fail_text_job(
    store: Lifecycle, worker: Worker, job_id: str, reason: str, retry: bool
) -> TextJob:
    """Give the job back to the queue, or (no retry, or out of attempts) fail and refund."""
    await store.fail_job(worker, job_id, reason, retry=retry)
    job = await get_text_job(store, job_id)
    assert job is not None
    return job
