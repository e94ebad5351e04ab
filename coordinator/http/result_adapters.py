"""The LoRAs and textual inversions an image result used: named and signed by the worker
beside its images (`ResultSubmit.adapters`), checked against the job, and kept, so that
the job's verification re-run uses the same CivitAI versions and files
(coordinator.economy.checks)."""

from __future__ import annotations

import json

from aiohttp import web

from coordinator.errors import BadRequest, Unauthorized
from coordinator.http.state import STORE
from coordinator.store import ImageJob, Worker
from protocol.adapted import adapters_message, resolved_matches
from protocol.errors import SignatureInvalid
from protocol.messages import ResultSubmit
from protocol.signing import verify

__all__ = ["record_adapters"]


async def record_adapters(
    request: web.Request, job: ImageJob, worker: Worker, body: ResultSubmit
) -> None:
    """Check the result's `adapters` (a 400 naming the field when they do not fit the job,
    a 401 for a bad signature) and keep them for the job's spot check."""
    if not (job.params.loras or job.params.tis):
        if body.adapters:
            raise BadRequest(
                "adapters: this job has no LoRAs or textual inversions",
                [("adapters", "leave it out for a job without LoRAs or TIs")],
            )
        return
    if not resolved_matches(job.params, body.adapters):
        raise BadRequest(
            "adapters must name the job's LoRAs, then its textual inversions, in order, as "
            "resolved (and match any version or file the job pins)",
            [("adapters", "name each LoRA and TI of the job with the version and SHA-256 used")],
        )
    message = adapters_message(job.id, job.params_hash, body.adapters)
    try:
        verify(worker.public_key, message, body.adapters_signature or "")
    except SignatureInvalid:
        raise Unauthorized(
            "adapters_signature does not verify with this worker's key",
            [("adapters_signature", "must sign adapters_message(job id, params hash, adapters)")],
        ) from None
    if job.verify_of is None:
        used = json.dumps([adapter.model_dump(mode="json") for adapter in body.adapters])
        await request.app[STORE].image_jobs.set_adapters(worker, job.id, used)
