"""Image jobs on the one lifecycle: what they add is their parameters, step progress, result
rows (one signed PNG per image) and settlement through coordinator.economy.payments and .checks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Row, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.accounts import Account
from coordinator.db import raw
from coordinator.db.database import VERIFICATION, now
from coordinator.db.prepared import Shapes
from coordinator.db.request_keys import Idempotent
from coordinator.db.schema import jobs, results
from coordinator.economy import checks, payments
from coordinator.economy.verification import Outcome
from coordinator.errors import Conflict
from coordinator.jobs import hot
from coordinator.jobs.lifecycle import Lifecycle, PollNote
from coordinator.workers import Worker
from protocol.control import CONTROL_TYPES
from protocol.horde import SAMPLERS_WITHOUT_HORDE_NAME
from protocol.params import ImageParams, sampled_steps, stored_params
from protocol.postprocess import POST_PROCESSORS
from protocol.signing import params_hash

__all__ = ["ImageJob", "ImageJobs", "ResultRecord"]


@dataclass(frozen=True)
class ImageJob:
    id: str
    account_id: int
    state: str
    params: ImageParams
    params_hash: str
    cost: int
    created_at: float
    worker_id: str | None
    lease_seconds: float
    lease_deadline: float | None
    attempts: int
    image: int
    step: int
    steps_total: int
    error: str | None
    leased_at: float | None = None
    # set on verification jobs: the job this one re-runs
    verify_of: str | None = None
    shared: bool = False
    # only workers that sign their results may run it
    signed_only: bool = False
    # an AI Horde worker's pay for it is held until then (None: nothing held)
    held_until: float | None = None
    # the options of an /api/v2 request (r2, ...); None for jobs from other doors
    horde: dict[str, Any] | None = None
    # its place in the queue (coordinator.jobs.queue)
    rank: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    # what Lifecycle.queue_info reads besides the fields above
    kind = "image"

    @property
    def n(self) -> int:
        return self.params.n


@dataclass(frozen=True)
class ResultRecord:
    index: int
    seed: int
    sha256: str
    signature: str


def _job(row: Row[Any]) -> ImageJob:
    return ImageJob(
        id=row.id,
        account_id=row.account_id,
        state=row.state,
        params=stored_params(row.params),
        params_hash=row.params_hash,
        cost=row.cost,
        created_at=row.created_at,
        worker_id=row.worker_id,
        lease_seconds=row.lease_seconds,
        lease_deadline=row.lease_deadline,
        attempts=row.attempts,
        image=row.image,
        step=row.step,
        steps_total=row.steps_total,
        error=row.error,
        leased_at=row.leased_at,
        verify_of=row.verify_of,
        shared=bool(row.shared),
        signed_only=bool(row.signed_only),
        held_until=row.held_until,
        horde=json.loads(row.horde) if row.horde else None,
        rank=float(row.rank),
    )


def _source_processing(mode: str) -> ColumnElement[bool]:
    # the params' compact JSON names it only when it is not txt2img (protocol.params); a
    # prompt cannot fake it, its quotes are escaped
    return jobs.c.params.contains(f'"source_processing":"{mode}"')


def _fits(
    signs: bool,
    img2img: bool,
    inpainting: bool,
    txt2img: bool,
    post_processors: frozenset[str],
    controlnets: tuple[str, ...] = (),
    annotators: tuple[str, ...] = (),
    loras: bool = False,
    named_only: bool = False,
) -> ColumnElement[bool]:
    """The image jobs a worker may pop, its offer bound at execution: max_pixels, max_steps
    and models (a job without a model fits any); jobs with a source image only for a
    worker that can serve them (`img2img`; `inpainting`: inpainting and outpainting), and
    jobs without one only for a worker that takes them (`txt2img`; not an inpainting
    checkpoint); jobs naming a post-processor only for a worker holding it; ControlNet
    jobs only of the `controlnets` types, and only with a ready control map
    (image_is_control) unless the type is among its `annotators`; with LoRAs or textual
    inversions only for one that takes them (`loras`); jobs naming no model not for a
    worker whose models cost more than a job naming none pays (`named_only`,
    coordinator.economy.image_models.named_only).
    coordinator.jobs.possible says the same in Python."""
    fits = (
        (jobs.c.kind == "image")
        & (jobs.c.pixels <= bindparam("max_pixels", type_=jobs.c.pixels.type))
        & (jobs.c.steps <= bindparam("max_steps", type_=jobs.c.steps.type))
        & (jobs.c.model.is_(None) | jobs.c.model.in_(bindparam("models", expanding=True)))
    )
    if not img2img:
        fits = fits & ~_source_processing("img2img")
    if not inpainting:
        fits = fits & ~_source_processing("inpainting") & ~_source_processing("outpainting")
    if not txt2img:
        fits = fits & (
            _source_processing("img2img")
            | _source_processing("inpainting")
            | _source_processing("outpainting")
        )
    for name in POST_PROCESSORS:
        if name not in post_processors:
            # in the params' JSON a name in quotes is a value (a prompt's quotes are
            # escaped); a model of that name would only keep its jobs from this worker
            fits = fits & ~jobs.c.params.contains(f'"{name}"')
    for control_type in CONTROL_TYPES:
        # (the params' compact JSON names them only when on, as for source_processing)
        control = jobs.c.params.contains(f'"control_type":"{control_type}"')
        if control_type not in controlnets:
            fits = fits & ~control
        elif control_type not in annotators:
            fits = fits & ~(control & ~jobs.c.params.contains('"image_is_control":true'))
    if not loras:
        # (named in the params' JSON only when not empty; a prompt's quotes are escaped)
        fits = fits & ~jobs.c.params.contains('"loras":') & ~jobs.c.params.contains('"tis":')
    if named_only:
        fits = fits & jobs.c.model.is_not(None)
    if not signs:
        # One image per job, a sampler AI Horde knows, and not for requesters who want
        # signed results.
        fits = fits & (jobs.c.signed_only == 0) & (jobs.c.n == 1)
        for name in SAMPLERS_WITHOUT_HORDE_NAME:
            fits = fits & ~jobs.c.params.contains(f'"sampler":"{name}"')
    return fits


_INSERT_RESULT = results.insert()
# (whether the worker signs its results, img2img, inpainting, txt2img, post-processors,
# its control types and annotators, loras) -> its filter, built once
_FITS: Shapes[ColumnElement[bool]] = Shapes()


class ImageJobs(Lifecycle):
    """Image jobs: the lifecycle plus parameters, progress, result rows and settlement."""

    kind = "image"

    async def create(
        self,
        account: Account,
        params: ImageParams,
        cost: int,
        *,
        signed_only: bool = False,
        horde: dict[str, Any] | None = None,
        idempotent: Idempotent | None = None,
    ) -> ImageJob:
        """Queue an image job and reserve its cost from the requester. `signed_only` keeps
        it from workers whose results are unsigned (AI Horde workers); `horde` keeps the
        options of an /api/v2 request."""
        row = await self._queue(
            account,
            cost,
            {
                "kind": "image",
                "params": params.model_dump_json(),
                "params_hash": params_hash(params),
                "model": params.model,
                "pixels": params.pixels,
                "steps": params.steps,
                "n": params.n,
                # (a hires fix samples a second pass: its lease covers both)
                "lease_seconds": self._db.config.lease_seconds(
                    params.pixels, max(params.steps, sampled_steps(params)), params.n
                ),
                "steps_total": params.steps,
                "signed_only": 1 if signed_only else 0,
                "horde": None if horde is None else json.dumps(horde),
            },
            "make it smaller (size, steps, n) or earn kudos by running a worker",
            idempotent,
        )
        return _job(row)

    async def get(self, job_id: str) -> ImageJob | None:
        """The image job with this id (None for no job, or a job of another kind)."""
        row = await self._db.read_first(hot.IMAGE_JOB_BY_ID, {"job_id": job_id})
        return _job(row) if row else None

    async def pop(
        self,
        worker: Worker,
        models: Sequence[str],
        max_pixels: int,
        max_steps: int,
        poll: PollNote | None = None,
        *,
        img2img: bool = False,
        inpainting: bool = False,
        txt2img: bool = True,
        post_processors: frozenset[str] = frozenset(),
        controlnets: Sequence[str] = (),
        control_annotators: Sequence[str] = (),
        loras: bool = False,
        named_only: bool = False,
    ) -> ImageJob | None:
        """Lease the best queued image job that fits the worker, if any (see Lifecycle._pop;
        `poll`: the worker's poll to note in the same transaction, Workers.poll_note;
        `img2img`, `inpainting`: whether it takes jobs with a source image, with a mask;
        `txt2img`: jobs without one; `post_processors`: the AI Horde post-processors it
        holds; `controlnets`, `control_annotators`: the ControlNet types it serves, and
        those it makes control maps for; `loras`: jobs with LoRAs or textual inversions;
        `named_only`: only jobs naming one of its models)."""
        shape = (
            worker.signs,
            img2img,
            inpainting,
            txt2img,
            post_processors,
            tuple(sorted(set(controlnets))),
            tuple(sorted(set(control_annotators) & set(controlnets))),
            loras,
            named_only,
        )
        fits = _FITS.get(shape, lambda: _fits(*shape))
        row = await self._pop(
            worker,
            fits,
            take_checks=True,
            shape=("image", *shape),
            params={"max_pixels": max_pixels, "max_steps": max_steps, "models": list(models)},
            poll=poll,
        )
        return None if row is None else _job(row)

    async def report_progress(
        self, worker: Worker, job_id: str, image: int, step: int, steps: int
    ) -> ImageJob:
        """Record progress and extend the lease by the job's lease length."""
        async with self._db.begin() as conn:
            row = await self._extend(
                conn, worker, job_id, image=image, step=step, steps_total=steps
            )
        return _job(row)

    async def complete(self, worker: Worker, job: ImageJob, images: list[ResultRecord]) -> int:
        """Mark done, store result rows and pay the worker, in one transaction; returns
        the kudos earned (paid now plus held pending)."""
        paid, held = await self.finish(worker, job, images)
        return paid + held

    async def finish(
        self,
        worker: Worker,
        job: ImageJob,
        images: list[ResultRecord],
        outcome: Outcome | None = None,
    ) -> tuple[int, int]:
        """Complete a leased job in one transaction: state, results, payment (part held
        while the worker is untrusted), speed check and maybe a spot check. For a
        verification job pass its `outcome`: what comparing its images with the original's
        found. Returns (kudos paid now, kudos held pending)."""
        async with self._db.begin() as conn:
            row = await self._finish(conn, worker, job.id)
            await raw.execute(
                conn,
                _INSERT_RESULT,
                [
                    {
                        "job_id": job.id,
                        "idx": image.index,
                        "seed": image.seed,
                        "sha256": image.sha256,
                        "signature": image.signature,
                        "worker_id": worker.id,
                    }
                    for image in images
                ],
            )
            if row.verify_of is not None:
                if outcome is None:
                    raise ValueError(f"job {job.id} is a spot check: pass its outcome")
                return await checks.record_check(
                    conn,
                    self._db.config,
                    row,
                    worker.id,
                    worker.account_id,
                    outcome,
                    [(image.index, image.sha256, image.signature) for image in images],
                )
            if not worker.signs:
                # unsigned: nothing to check it against; the requester may dispute it
                held = await payments.hold_for_dispute(conn, self._db.config, worker.id, row)
                self.ranking.changed("image")
                return 0, held
            me = (await raw.execute(conn, payments.WORKER_ROW, {"worker_id": worker.id})).one()
            if await checks.unrefereed(conn, self._db.config, me, row, row.finished_at):
                # no trusted worker has its refiner setup to check it: as unsigned
                await checks.speed_check(conn, self._db.config, worker.id, row, row.finished_at)
                held = await payments.hold_for_dispute(conn, self._db.config, worker.id, row)
                self.ranking.changed("image")
                return 0, held
            paid, held = await payments.pay_worker(
                conn,
                self._db.config,
                payments.Pay(
                    worker.id,
                    worker.account_id,
                    job.cost,
                    job.id,
                    f"settle:{job.id}",
                    granted=await payments.job_grants(conn, job.id),
                ),
            )
            await checks.after_result(
                conn,
                self._db.config,
                me,
                row,
                row.finished_at,
                self._db.system_account(VERIFICATION),
            )
        # the throughput behind ETAs changed
        self.ranking.changed("image")
        return paid, held

    async def account_jobs(self, account: Account, limit: int, offset: int) -> list[ImageJob]:
        """`account`'s image jobs, newest first (spot checks are not the account's)."""
        query = (
            select(jobs)
            .where(
                (jobs.c.account_id == account.id)
                & (jobs.c.kind == "image")
                & jobs.c.verify_of.is_(None)
            )
            .order_by(jobs.c.created_at.desc(), jobs.c.id)
            .limit(limit)
            .offset(offset)
        )
        async with self._db.begin() as conn:
            return [_job(row) for row in (await conn.execute(query)).all()]

    async def release_held(self) -> int:
        """Pay AI Horde workers whose held pay is due (payments.release_held); how many jobs."""
        released = 0
        while True:
            async with self._db.begin() as conn:
                count = await payments.release_held(conn, now(conn))
            released += count
            if count < payments.RELEASE_BATCH:
                return released

    async def dispute(self, job_id: str, why: str) -> tuple[int, list[str]]:
        """The requester disputes an AI Horde worker's result while its pay is held
        (payments.dispute): the kudos refunded, and the digests of its images that no other
        result, nor any job as its source image or mask, uses (the caller deletes those
        files). Conflict when nothing is held for it
        (any more); Forbidden past the account's dispute limits."""
        async with self._db.begin() as conn:
            row = (
                await conn.execute(select(jobs).where(jobs.c.id == job_id).with_for_update())
            ).first()
            if row is None or row.held_until is None:
                raise Conflict(
                    f"nothing is held for job {job_id}: only results of AI Horde workers "
                    "(unsigned), or of a refiner no trusted worker has, can be disputed, and "
                    "only until their pay is released"
                )
            digests = set(
                (
                    await conn.execute(select(results.c.sha256).where(results.c.job_id == job_id))
                ).scalars()
            )
            refunded = await payments.dispute(conn, self._db.config, row, why)
            still_used = set(
                (
                    await conn.execute(
                        select(results.c.sha256).where(results.c.sha256.in_(digests))
                    )
                ).scalars()
            )
            for digest in digests - still_used:
                # the same bytes may be another job's source image or mask (a result sent
                # back for img2img): that job still needs the file
                if await self._is_source(conn, digest):
                    still_used.add(digest)
        return refunded, sorted(digests - still_used)

    @staticmethod
    async def _is_source(conn: AsyncConnection, digest: str) -> bool:
        named = jobs.c.params.contains(f'"source_image":"{digest}"') | jobs.c.params.contains(
            f'"source_mask":"{digest}"'
        )
        found = await conn.execute(select(jobs.c.id).where(named).limit(1))
        return found.first() is not None

    async def fail(
        self, worker: Worker, job_id: str, reason: str, *, counts: bool = True
    ) -> ImageJob:
        return _job(await self._fail(worker, job_id, reason, counts=counts))

    async def original_results(self, job: ImageJob) -> list[ResultRecord]:
        """For a verification job: the results of the job it re-runs."""
        if job.verify_of is None:
            return []
        return await self.results(job.verify_of)

    async def results(self, job_id: str) -> list[ResultRecord]:
        query = select(results).where(results.c.job_id == job_id).order_by(results.c.idx)
        async with self._db.begin() as conn:
            rows = (await conn.execute(query)).all()
        return [ResultRecord(r.idx, r.seed, r.sha256, r.signature) for r in rows]

    async def set_adapters(self, worker: Worker, job_id: str, adapters: str) -> None:
        """Keep the LoRAs and TIs (JSON) the result of a job leased to `worker` used."""
        async with self._db.begin() as conn:
            await conn.execute(
                update(jobs).where(self._leased_to(worker, job_id)).values(adapters=adapters)
            )

    async def set_shared(self, job_id: str, shared: bool) -> None:
        async with self._db.begin() as conn:
            await conn.execute(
                update(jobs).where(jobs.c.id == job_id).values(shared=1 if shared else 0)
            )
