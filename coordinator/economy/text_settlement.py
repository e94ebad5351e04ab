"""Settling a finished text job: the usage report checked against what the job could have
made, the charge, the refund, every payee's pay and the spot checks it carries -- in the
caller's transaction (coordinator.jobs.text.TextJobs.complete).

The report is checked against what it could be: every span inside the model's blocks and
served by a linked peer, the spans covering every block for the tokens claimed, every spot
check of a server on blocks it served (coordinator.economy.text_checks applies them). The
charge is the catalog's price of those tokens through the model once (replays are the
network's cost), never more than the reservation. The block servers' owners are paid by
block-tokens served and the gateway's owner for its embeddings and head (one more block),
through coordinator.economy.payments (held in part while untrusted). A verification job (a
trusted gateway re-running another's job) charges nobody: its workers are paid from the
grants account, at most what the checked job reserved, and its text decides the check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.config import CoordinatorConfig
from coordinator.db.database import ESCROW, GRANTS, VERIFICATION
from coordinator.db.ledger import post_entry
from coordinator.db.schema import jobs
from coordinator.economy import payments, text_checks
from coordinator.errors import BadRequest
from protocol.cost import text_work
from protocol.text import (
    MAX_CHARS_PER_TOKEN,
    TextModel,
    TextParams,
    TextResultSubmit,
    text_cap,
    token_bound,
)

__all__ = ["Settlement", "check_report", "grant_parts", "settle", "split_kudos"]

# a block server may process a token more than once: a speculative step's rejected drafts
# (the gateway reports at most as many as the tokens kept) and the history replayed after
# a failover, drafts included. The requester pays for each token once whatever the spans
# say (`_price`); this only bounds how a report may skew the servers' shares.
MAX_REPLAYS_PER_TOKEN = 8


@dataclass(frozen=True)
class Settlement:
    charged: int
    refunded: int
    paid: dict[int, int]  # account id -> kudos
    verified: str | None = None  # for a spot check: the job it re-ran


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


def grant_parts(granted: int, shares: Sequence[int]) -> list[int]:
    """Split `granted` (at most their sum) over `shares` in proportion, never more than a
    share (integer largest remainder), so that the parts add up to `granted` exactly."""
    whole = sum(shares)
    if granted > whole or granted < 0:
        raise ValueError(f"{granted} granted kudos do not fit in shares of {whole}")
    if not whole:
        return [0] * len(shares)
    parts = [granted * share // whole for share in shares]
    remainders = sorted(range(len(shares)), key=lambda i: (-(granted * shares[i] % whole), i))
    left = granted - sum(parts)
    for i in remainders:
        if left == 0:
            break
        if parts[i] < shares[i]:
            parts[i] += 1
            left -= 1
    return parts


def _check_checks(result: TextResultSubmit, model: TextModel) -> list[tuple[str, str]]:
    """The gateway's spot checks that the job could not have made: blocks outside the
    model, blocks that neither the checked server nor its checkers served in this job, a
    `wrong` that no referee decided."""
    served: dict[str, list[tuple[int, int]]] = {}
    for span in result.spans:
        served.setdefault(span.peer_id, []).append((span.start, span.end))
    problems: list[tuple[str, str]] = []
    for i, check in enumerate(result.checks):
        if check.end > model.blocks:
            problems.append((f"checks[{i}].end", f"model {model.name} has {model.blocks} blocks"))
        elif not any(
            a <= check.start and check.end <= b
            for peer in (check.peer_id, *check.checkers)
            for a, b in served.get(peer, [])
        ):
            # (the checked server is usually the one that served the span; when the second
            # server was the odd one out, it is the checked one and the server of the span
            # is among its checkers)
            problems.append(
                (
                    f"checks[{i}].peer_id",
                    f"neither peer {check.peer_id} nor its checkers served a span holding "
                    f"blocks {check.start}:{check.end} in this job's spans",
                )
            )
        if check.verdict == "wrong" and len(check.checkers) < 2:
            problems.append(
                (
                    f"checks[{i}].checkers",
                    "a 'wrong' verdict names the second server and the referee that decided",
                )
            )
    return problems


def _check_logprobs(params: TextParams, result: TextResultSubmit) -> list[tuple[str, str]]:
    """Logprobs only where asked: one per completion token, top_logprobs alternatives each
    (so at most max_tokens x 21 entries)."""
    if result.logprobs is None:
        return []
    if not params.logprobs:
        return [("logprobs", "must be left out: the job did not ask for them")]
    if len(result.logprobs) != result.completion_tokens:
        return [("logprobs", f"must hold one entry per token ({result.completion_tokens})")]
    for i, entry in enumerate(result.logprobs):
        if len(entry.top_logprobs) > params.top_logprobs:
            return [(f"logprobs[{i}].top_logprobs", f"must be at most {params.top_logprobs}")]
    return []


def check_report(params: TextParams, result: TextResultSubmit, model: TextModel) -> None:
    """BadRequest naming every part of the report that the job could not have made."""
    problems: list[tuple[str, str]] = []
    if result.completion_tokens > params.max_tokens:
        problems.append(("completion_tokens", f"must be at most {params.max_tokens}"))
    if result.prompt_tokens + result.completion_tokens > token_bound(params):
        problems.append(("prompt_tokens", "is more than the prompt can tokenize to"))
    if len(result.text) > text_cap(params.max_tokens):
        cap = text_cap(params.max_tokens)
        problems.append(
            ("text", f"must be at most {cap} characters (max_tokens x {MAX_CHARS_PER_TOKEN})")
        )
    processed = result.prompt_tokens + result.completion_tokens
    # tokens each block ran, from the spans (a difference array: spans may be many)
    change = [0] * (model.blocks + 1)
    for i, span in enumerate(result.spans):
        if span.end > model.blocks:
            problems.append((f"spans[{i}].end", f"model {model.name} has {model.blocks} blocks"))
            continue
        change[span.start] += span.tokens
        change[span.end] -= span.tokens
    ran, block = [], 0
    for step in change[:-1]:
        block += step
        ran.append(block)
    # every block ran every token but the last one sampled (never fed back); failovers
    # replay a server's history, so a block may run a token a few times
    need, most = processed - 1, processed * MAX_REPLAYS_PER_TOKEN
    short = next((b for b, tokens in enumerate(ran) if tokens < need), None)
    if short is not None:
        problems.append(
            (
                "spans",
                f"must cover every block of {model.name} for the {need} tokens claimed "
                f"(prompt + completion - 1), but block {short} ran {ran[short]}",
            )
        )
    over = next((b for b, tokens in enumerate(ran) if tokens > most), None)
    if over is not None:
        problems.append(
            ("spans", f"block {over} ran {ran[over]} tokens, more than the job could ({most})")
        )
    problems += _check_checks(result, model)
    problems += _check_logprobs(params, result)
    if problems:
        raise BadRequest(
            "the usage report does not fit the job: " + "; ".join(f"{f} {m}" for f, m in problems),
            problems,
        )


def _price(
    linked: dict[str, Row[Any]],
    gateway: tuple[str, int],
    result: TextResultSubmit,
    model: TextModel,
    cap: int,
) -> tuple[int, dict[tuple[str, int], int]]:
    """(the charge, at most `cap`; the units of work per payee, (worker id, account id)):
    block-tokens per server, then the gateway's embeddings and head as one more block."""
    units: dict[tuple[str, int], int] = {}
    for span in result.spans:
        server = linked[span.peer_id]
        payee = (server.id, int(server.account_id))
        units[payee] = units.get(payee, 0) + span.tokens * (span.end - span.start)
    processed = result.prompt_tokens + result.completion_tokens
    # the requester pays for the tokens claimed through the model once: replays after
    # a failover are paid to the servers that ran them, out of the same price
    charged_units = min(sum(units.values()), processed * model.blocks) + processed
    units[gateway] = units.get(gateway, 0) + processed
    work = text_work(charged_units, 1, model.parameters)
    return (min(cap, max(1, math.ceil(work))) if charged_units else 0), units


async def settle(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    gateway_id: str,
    gateway_account: int,
    row: Row[Any],
    result: TextResultSubmit,
    model: TextModel,
) -> Settlement:
    """Settle text job `row` (just finished by gateway `gateway_id`) from its report
    `result` (checked first with `check_report`): refund what the work did not use, pay
    every payee from escrow (or, for a verification job, from the grants account), apply
    the gateway's spot checks of its servers, then maybe schedule a check of the gateway or,
    for a verification job, decide its check. One ledger entry per movement."""
    job_id, cost_reserved = row.id, int(row.cost)
    peers = {span.peer_id for span in result.spans}
    linked = await text_checks.peer_workers(conn, peers)
    unlinked = sorted(peers - linked.keys())
    if unlinked:
        raise BadRequest(
            f"the usage report names block servers not linked to any worker "
            f"({', '.join(unlinked[:3])}); block servers link their peer id when they "
            "start (`idlegrid worker blocks --coordinator ...`), and only they are paid",
            [("spans", f"peer {unlinked[0]} is not linked to a worker")],
        )
    checked = (
        None
        if row.verify_of is None
        else (await conn.execute(select(jobs).where(jobs.c.id == row.verify_of))).one()
    )
    cap = cost_reserved if checked is None else int(checked.cost)
    cost, units = _price(linked, (gateway_id, gateway_account), result, model, cap)
    payees = sorted(units)
    shares = split_kudos(cost, [units[p] for p in payees])
    if cost_reserved > cost:
        await post_entry(
            conn,
            reason="refund",
            key=f"refund:{job_id}",
            job_id=job_id,
            moves=[
                (await payments.system_id(conn, ESCROW), cost - cost_reserved),
                (row.account_id, cost_reserved - cost),
            ],
        )
    # what grants funded of the job reaches every payee as grants, in proportion
    granted = grant_parts(await payments.job_grants(conn, job_id), shares)
    paid: dict[int, int] = {}
    for (worker_id, account_id), share, grant in zip(payees, shares, granted, strict=True):
        # untrusted workers get part of it held pending verification (economy.payments)
        await payments.pay_worker(
            conn,
            config,
            payments.Pay(
                worker_id,
                account_id,
                share,
                job_id,
                f"settle:{job_id}:{worker_id}",
                reason="settle" if checked is None else "verify",
                source=None if checked is None else await payments.system_id(conn, GRANTS),
                granted=grant,
            ),
        )
        if share:
            paid[account_id] = paid.get(account_id, 0) + share
    # the gateway's spot checks of the servers release or forfeit what is held
    await text_checks.apply_server_checks(conn, config, gateway_id, job_id, result.checks)
    if checked is None:
        await text_checks.after_text_result(
            conn,
            config,
            gateway_id,
            row,
            float(row.finished_at),
            await payments.system_id(conn, VERIFICATION),
        )
    else:
        await text_checks.record_text_check(conn, config, row, result.text)
    charged = cost if checked is None else 0
    return Settlement(
        charged=charged,
        refunded=cost_reserved - cost if checked is None else 0,
        paid=paid,
        verified=None if checked is None else checked.id,
    )
