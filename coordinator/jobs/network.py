"""The network at a glance: who serves what, which models are offered, how long the queues
are. One view for the web page (/api/v1/network), AI Horde's /v2/status/models and
/v2/workers, and the operator's /metrics."""

from __future__ import annotations

import heapq
import json
from collections import Counter
from typing import Any

from sqlalchemy import func, select

from coordinator.db.database import Database, now
from coordinator.db.schema import jobs, workers
from coordinator.jobs.possible import Offer, WorkerOffer
from protocol.messages import NetworkModel, NetworkQueue, NetworkStatus, NetworkWorker

__all__ = ["LISTED_SECONDS", "ONLINE_SECONDS", "Network"]

# A worker that polled (or registered, or finished a job) this recently is online: the
# window in which coordinator.economy.checks counts a trusted worker as around to referee.
# Block servers talk to the coordinator only when they register and link their peer ids
# (the swarm's DHT knows the live ones), so they count as online only for a while after.
ONLINE_SECONDS = 600.0
# workers seen within this long are listed (offline ones marked so)
LISTED_SECONDS = 86400.0


def _worker(row: Any, at: float) -> NetworkWorker:
    offer = Offer.loads(row.offer) if row.kind == "image" else None
    return NetworkWorker(
        id=row.id,
        name=row.name,
        kind=row.kind,
        protocol=row.protocol,
        trusted=bool(row.trusted),
        online=at - row.last_seen <= ONLINE_SECONDS,
        models=json.loads(row.models) if row.models else [],
        post_processors=[] if offer is None else list(offer.post_processors),
        controlnets=[] if offer is None else list(offer.controlnets),
        control_annotators=[] if offer is None else list(offer.control_annotators),
        jobs_done=row.jobs_done,
        last_seen=row.last_seen,
        img2img=None if offer is None else offer.img2img,
        inpainting=None if offer is None else offer.inpainting,
    )


class Network:
    """The network view over the database. Part of coordinator.store.Store."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def status(
        self, *, online_only: bool = False, max_models: int | None = None
    ) -> NetworkStatus:
        """Workers seen lately, the models the online ones offer with their queues (the
        `max_models` most offered, then most wanted, if given), and the queue of each kind."""
        async with self._db.begin() as conn:
            at = now(conn)
            since = at - (ONLINE_SECONDS if online_only else LISTED_SECONDS)
            rows = (
                await conn.execute(
                    select(workers)
                    .where(workers.c.kind.is_not(None) & (workers.c.last_seen >= since))
                    .order_by(workers.c.last_seen.desc())
                    .limit(1000)
                )
            ).all()
            counts = (
                await conn.execute(
                    select(jobs.c.kind, jobs.c.state, jobs.c.model, func.count())
                    .where(jobs.c.state.in_(("queued", "leased")) & jobs.c.verify_of.is_(None))
                    .group_by(jobs.c.kind, jobs.c.state, jobs.c.model)
                )
            ).all()
        listed = [_worker(row, at) for row in rows]
        offering: Counter[tuple[str, str]] = Counter()
        for worker in listed:
            if worker.online and worker.kind in ("image", "text"):
                offering.update((worker.kind, model) for model in worker.models)
        queued: Counter[tuple[str, str]] = Counter()
        per_kind: dict[str, dict[str, int]] = {"image": {}, "text": {}}
        for kind, state, model, count in counts:
            if kind not in per_kind:
                continue
            per_kind[kind][state] = per_kind[kind].get(state, 0) + count
            if state == "queued" and model is not None:
                queued[(kind, model)] += count
        named = set(offering) | set(queued)
        if max_models is not None and len(named) > max_models:
            # chosen before any model object is built: workers may offer tens of thousands
            named = set(
                heapq.nsmallest(max_models, named, key=lambda k: (-offering[k], -queued[k], k))
            )
        models = [
            NetworkModel(
                name=name, kind=kind, workers=offering[(kind, name)], queued=queued[(kind, name)]
            )
            for kind, name in sorted(named)
        ]
        image, text = per_kind["image"], per_kind["text"]
        queue = [
            NetworkQueue(
                kind="image", queued=image.get("queued", 0), running=image.get("leased", 0)
            ),
            NetworkQueue(kind="text", queued=text.get("queued", 0), running=text.get("leased", 0)),
        ]
        held = {
            name
            for worker in listed
            if worker.online and worker.kind == "image"
            for name in worker.post_processors
        }
        return NetworkStatus(
            workers=listed, models=models, queue=queue, post_processors=sorted(held)
        )

    async def image_offers(self) -> list[WorkerOffer]:
        """What the online, unpaused image workers offer (coordinator.jobs.possible)."""
        async with self._db.begin() as conn:
            at = now(conn)
            rows = (
                await conn.execute(
                    select(workers.c.models, workers.c.protocol, workers.c.offer)
                    .where(
                        (workers.c.kind == "image")
                        & (workers.c.paused == 0)
                        & (workers.c.last_seen >= at - ONLINE_SECONDS)
                    )
                    .limit(1000)
                )
            ).all()
        return [
            WorkerOffer(
                models=tuple(json.loads(row.models)) if row.models else (),
                signs=row.protocol == "idlegrid",
                offer=Offer.loads(row.offer),
            )
            for row in rows
        ]

    async def worker_records(
        self, worker_id: str | None = None
    ) -> tuple[float, list[tuple[Any, int]]]:
        """(now, [(worker row, kudos its finished jobs cost)]): the online workers, or the one
        worker `worker_id` whether online or not."""
        async with self._db.begin() as conn:
            at = now(conn)
            query = select(workers)
            if worker_id is None:
                query = query.where(
                    workers.c.kind.is_not(None) & (workers.c.last_seen >= at - ONLINE_SECONDS)
                )
            else:
                query = query.where(workers.c.id == worker_id)
            rows = (await conn.execute(query.order_by(workers.c.name).limit(1000))).all()
            earned = dict(
                (
                    await conn.execute(
                        select(jobs.c.worker_id, func.coalesce(func.sum(jobs.c.cost), 0))
                        .where(
                            jobs.c.worker_id.in_([row.id for row in rows])
                            & (jobs.c.state == "done")
                        )
                        .group_by(jobs.c.worker_id)
                    )
                ).all()
            )
        return at, [(row, int(earned.get(row.id, 0))) for row in rows]
