"""Settling a text job an AI Horde text worker (a KoboldCpp / aphrodite bridge) finished.

Its text is unsigned and comes from a backend we cannot re-run, and AI Horde's submit
reports no token counts, so the work is estimated from what the job allowed: the prompt's
UTF-8 bytes / `BYTES_PER_TOKEN` (at most the context it was given less `max_length`) plus
the text's (at most `max_length`), priced with the catalog's price per token
(protocol.cost.text_cost through the model's blocks and its embeddings and head, as a
reservation is), never more than the reservation. The rest is refunded; what is charged is
held on the worker's pending account (coordinator.economy.payments.hold_for_dispute) and
released after `horde_hold_seconds` unless the requester disputes it first. What grants
funded of the job stays grants all the way (the refund gives the requester's grants back
first; the hold and its release carry the rest as grants: coordinator.db.ledger).
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.config import CoordinatorConfig
from coordinator.db.database import ESCROW
from coordinator.db.ledger import post_entry
from coordinator.db.schema import jobs
from coordinator.economy import payments
from protocol.cost import text_cost
from protocol.text import TextModel, TextParams

__all__ = ["BYTES_PER_TOKEN", "charge", "cut_at_stop", "estimated_tokens", "hold"]

# the estimate of tokens in text: about 4 bytes of English per token for BPE vocabularies
BYTES_PER_TOKEN = 4


def estimated_tokens(params: TextParams, text: str, context: int) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of a job given `context` tokens, estimated."""
    prompt = math.ceil(len((params.prompt or "").encode()) / BYTES_PER_TOKEN)
    completion = math.ceil(len(text.encode()) / BYTES_PER_TOKEN)
    return min(prompt, context - params.max_tokens), min(completion, params.max_tokens)


def charge(model: TextModel, tokens: int, reserved: int) -> int:
    """The catalog's price of `tokens` tokens of `model`, at most `reserved`."""
    return min(reserved, text_cost(tokens, model.blocks + 1, model.parameters))


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop sequence (a stop is never part of the answer), and
    whether one was found. KoboldAI backends keep the stop sequence in their text."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)


async def hold(
    conn: AsyncConnection, config: CoordinatorConfig, worker_id: str, row: Row[Any], price: int
) -> int:
    """In the caller's transaction, for text job `row` just finished by AI Horde worker
    `worker_id`: refund what `price` leaves of the reservation, then hold `price` for
    dispute (the job's cost is what is held from now on). Returns the kudos held."""
    reserved = int(row.cost)
    if price < reserved:
        await post_entry(
            conn,
            reason="refund",
            key=f"refund:{row.id}",
            job_id=row.id,
            moves=[
                (await payments.system_id(conn, ESCROW), price - reserved),
                (int(row.account_id), reserved - price),
            ],
        )
        await conn.execute(update(jobs).where(jobs.c.id == row.id).values(cost=price))
        row = (await conn.execute(select(jobs).where(jobs.c.id == row.id))).one()
    return await payments.hold_for_dispute(conn, config, worker_id, row)
