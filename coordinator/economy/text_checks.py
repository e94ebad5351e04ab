"""Text spot checks: gateways' checks of block servers, and gateways checked by gateways.

**Block servers.** What a finished text job's report does to its servers' trust.

A gateway re-runs a sampled step of block server `peer_id` on another server and, after a
disagreement, has a third decide (protocol.text.ServerCheck). Its checks travel in the
signed usage report. They are believed only when they are independent and from someone
believable:
- the gateway is trusted (a seed of the operator's, or it earned it), and
- the checked server's worker is independent (`checks.independent`: another worker, another
  owner and, with `verify_distinct_ip`, another client IP) of the gateway and of every
  checker; every peer id named must be linked to a worker (an unlinked one counts for
  nothing).

A believed `agree` is a passed check of the server's worker (`checks.pass_check`: its held
pay is released, trust after `trust_after_checks`); a believed `wrong` (the second server
and a referee agreed against it) is a failed one (`checks.fail_check`: suspicion, held pay
forfeited, trust revoked, pause after `pause_after_suspicions`); `undecided` does nothing.
One job gives each worker at most one verdict, `wrong` before `agree`: repeating a check in
a report counts once. The coordinator checks beforehand
(coordinator.economy.text_settlement) that each check's blocks lie in the model and that
`peer_id`, or the server it was checked against, served them in this job.

**Gateways**, the way images are checked (coordinator.economy.checks): a finished text job
of a gateway, with deterministic parameters (greedy, or seeded: every job is seeded at
submit), is re-run with the same parameters as a verification job (`verify_of`) with the
gateway's `spot_check_rate`, by a trusted gateway independent of it (`checks.checks_for`).
Its text agrees with the original's when they are equal or share their first
`text_check_prefix_chars` characters (floating-point drift across machines can flip a
near-tie late in a long generation; 0 = equal only). `checks.judge` applies the quorum of
two: agreement releases the gateway's held pay, two disagreements forfeit it with a
suspicion and give the requester the verifier's text. A verification job costs the
requester nothing: its gateway and servers are paid from the grants account, as grants
(coordinator.economy.text_settlement).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.config import CoordinatorConfig
from coordinator.db.schema import jobs, text_outputs, worker_peers, workers
from coordinator.economy import checks as spot_checks
from protocol.text import ServerCheck, TextParams

__all__ = [
    "after_text_result",
    "apply_server_checks",
    "peer_workers",
    "record_text_check",
    "texts_agree",
]


async def peer_workers(conn: AsyncConnection, peer_ids: set[str]) -> dict[str, Row[Any]]:
    """peer id -> its worker's row, for the linked ones."""
    if not peer_ids:
        return {}
    query = (
        select(worker_peers.c.peer_id, workers)
        .select_from(worker_peers.join(workers, workers.c.id == worker_peers.c.worker_id))
        .where(worker_peers.c.peer_id.in_(sorted(peer_ids)))
    )
    return {row.peer_id: row for row in (await conn.execute(query)).all()}


async def apply_server_checks(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    gateway_id: str,
    job_id: str,
    checks: Sequence[ServerCheck],
) -> dict[str, str]:
    """Apply gateway `gateway_id`'s believable checks from the report of text job `job_id`,
    in the caller's transaction (after the job's pay, so that this job's held pay is
    released or forfeited with the rest). Returns worker id -> verdict applied."""
    decided = [check for check in checks if check.verdict != "undecided"]
    if not decided:
        return {}
    gateway = (await conn.execute(select(workers).where(workers.c.id == gateway_id))).one()
    if not gateway.trusted:
        return {}
    named = {check.peer_id for check in decided} | {p for c in decided for p in c.checkers}
    linked = await peer_workers(conn, named)
    verdicts: dict[str, str] = {}
    for check in decided:
        served = linked.get(check.peer_id)
        judges = [linked.get(peer) for peer in check.checkers]
        if served is None or any(judge is None for judge in judges):
            continue
        if not all(spot_checks.independent(config, served, other) for other in (gateway, *judges)):
            continue
        if verdicts.get(served.id) != "wrong":
            verdicts[served.id] = check.verdict
    for worker_id, verdict in sorted(verdicts.items()):
        key = f"text:{job_id}:{worker_id}"
        if verdict == "agree":
            await spot_checks.pass_check(conn, config, worker_id, job_id, key)
        else:
            why = f"two block servers agreed against it on text job {job_id}"
            await spot_checks.fail_check(conn, config, worker_id, job_id, key, why)
    return verdicts


# --- gateways -----------------------------------------------------------------------------


def texts_agree(config: CoordinatorConfig, original: str, verified: str) -> bool:
    """The rule of a gateway's spot check: equal texts, or equal first
    `text_check_prefix_chars` characters (when that is more than 0)."""
    if original == verified:
        return True
    prefix = config.text_check_prefix_chars
    return prefix > 0 and len(original) >= prefix and original[:prefix] == verified[:prefix]


async def after_text_result(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    gateway_id: str,
    job: Row[Any],
    now: float,
    verification_account: int,
) -> None:
    """Maybe schedule a spot check of a finished ordinary text job: another gateway re-runs
    it with the same parameters (only deterministic ones: greedy, or seeded)."""
    params = TextParams.model_validate_json(job.params)
    if params.temperature != 0 and params.seed is None:
        return
    gateway = (await conn.execute(select(workers).where(workers.c.id == gateway_id))).one()
    if random.random() < spot_checks.spot_check_rate(config, gateway):
        await spot_checks.queue_check_if_refereed(
            conn, config, gateway, job, now, verification_account
        )


async def record_text_check(
    conn: AsyncConnection, config: CoordinatorConfig, check: Row[Any], verified: str
) -> bool:
    """Apply what verification job `check` found (its text `verified`) to the gateway of the
    job it re-ran; True if it agreed. On a conviction the requester gets the verifier's
    text."""
    original = (await conn.execute(select(jobs).where(jobs.c.id == check.verify_of))).one()
    mine = text_outputs.c.job_id == original.id
    text = (await conn.execute(select(text_outputs.c.text).where(mine))).scalar_one()
    agree = texts_agree(config, str(text), verified)
    if await spot_checks.judge(conn, config, check, original, agree):
        await conn.execute(update(text_outputs).where(mine).values(text=verified))
    return agree
