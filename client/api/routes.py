"""The requester's routes: accounts, image jobs and text jobs, as `Call`s (client.api.core).

Each function builds one request and names the model its answer decodes into; the faces
(client.sdk.AsyncClient, client.sdk.Client) send them. Jobs are submitted with an
Idempotency-Key (a new UUID unless given), so that a retry of the same call never makes a
second job or pays twice.
"""

from __future__ import annotations

import base64
import uuid

from client.api.core import Call, Request, body, call
from protocol.messages import (
    AccountCreate,
    AccountCreated,
    AccountInfo,
    Health,
    HistoryPage,
    ImageJobCreated,
    InviteCreate,
    InvitesCreated,
    JobCancelled,
    JobStatus,
    Quote,
    RatingCreate,
    RatingRecorded,
    ShareState,
    ShareUpdate,
    TransferCreate,
    TransferDone,
    WorkerInfo,
)
from protocol.openai import ModelList
from protocol.params import ImageParams
from protocol.text import TextJobCreated, TextParams, TextStatus

__all__ = [
    "cancel",
    "health",
    "cancel_text",
    "history",
    "image",
    "invite",
    "job",
    "me",
    "models",
    "quote_image",
    "rate",
    "register",
    "share",
    "submit_image",
    "submit_text",
    "text_job",
    "transfer",
    "worker",
]

JOBS = "/api/v1/jobs"
TEXT_JOBS = "/api/v1/text/jobs"


def _idempotent(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key or str(uuid.uuid4())}


def health() -> Call[Health]:
    """The coordinator's release and readiness (`GET /healthz`; its Date header tells its
    clock)."""
    return call(Request("GET", "/healthz"), Health)


# --- accounts ------------------------------------------------------------------------


def register(name: str, invite: str | None = None) -> Call[AccountCreated]:
    """Create an account (`invite`: a code, where registration is invite-only)."""
    message = AccountCreate.model_construct(name=name, invite=invite)
    return call(Request("POST", "/api/v1/accounts", json=body(message)), AccountCreated)


def invite(count: int = 1) -> Call[list[str]]:
    """Make single-use invite codes (as many as the coordinator allows per account)."""
    message = InviteCreate.model_construct(count=count)
    request = Request("POST", "/api/v1/invites", json=body(message))
    return Call(request, lambda content: InvitesCreated.model_validate_json(content).codes)


def me() -> Call[AccountInfo]:
    """The caller's account: name, balance, limits."""
    return call(Request("GET", "/api/v1/accounts/me"), AccountInfo)


def history(limit: int = 50, before: int | None = None) -> Call[HistoryPage]:
    """The caller's ledger entries, newest first; pass `next_before` on for older ones."""
    params = {"limit": str(limit)}
    if before is not None:
        params["before"] = str(before)
    return call(Request("GET", "/api/v1/accounts/me/history", params=params), HistoryPage)


def transfer(to: str, amount: int, idempotency_key: str | None = None) -> Call[TransferDone]:
    """Give `amount` kudos to user `to`. Retrying with the same `idempotency_key` (a new
    UUID if absent; returned in the answer) never pays twice."""
    message = TransferCreate.model_construct(to=to, amount=amount)
    headers = _idempotent(idempotency_key)
    return call(
        Request("POST", "/api/v1/transfers", json=body(message), headers=headers), TransferDone
    )


def worker(worker_id: str) -> Call[WorkerInfo]:
    """A worker's public record: trust, checks, rating, engine."""
    return call(Request("GET", f"/api/v1/workers/{worker_id}"), WorkerInfo)


# --- image jobs ----------------------------------------------------------------------


def quote_image(params: ImageParams) -> Call[Quote]:
    """Cost, balance, queue and ETA of a job, without submitting it."""
    return call(Request("POST", "/api/v1/quotes/image", json=_params(params)), Quote)


def submit_image(
    params: ImageParams,
    idempotency_key: str | None = None,
    source_image: bytes | None = None,
    source_mask: bytes | None = None,
    nsfw: bool = False,
) -> Call[ImageJobCreated]:
    """Queue an image job; with `source_image` (and `source_mask`: white = repaint) as the
    raw bytes of a PNG, WebP or JPEG, sent as base64 (`params.source_processing` says what
    to do with them); `nsfw`: the request is NSFW (needed for a model the coordinator's
    image model reference marks nsfw)."""
    fields = _params(params)
    if nsfw:
        fields["nsfw"] = True
    for name, data in (("source_image", source_image), ("source_mask", source_mask)):
        if data is not None:
            fields[name] = base64.b64encode(data).decode()
    request = Request("POST", f"{JOBS}/image", json=fields, headers=_idempotent(idempotency_key))
    return call(request, ImageJobCreated)


def job(job_id: str) -> Call[JobStatus]:
    """An image job's status now."""
    return call(Request("GET", f"{JOBS}/{job_id}"), JobStatus)


def image(job_id: str, index: int) -> Call[bytes]:
    """One finished image's PNG bytes."""
    return Call(Request("GET", f"{JOBS}/{job_id}/images/{index}"), bytes)


def cancel(job_id: str) -> Call[JobCancelled]:
    """Cancel a queued or running image job; its reserved kudos are refunded."""
    return call(Request("POST", f"{JOBS}/{job_id}/cancel"), JobCancelled)


def share(job_id: str, shared: bool = True) -> Call[ShareState]:
    """Let any registered user see and rate the job's images (or stop)."""
    message = ShareUpdate.model_construct(shared=shared)
    return call(Request("POST", f"{JOBS}/{job_id}/share", json=body(message)), ShareState)


def rate(job_id: str, index: int, score: int) -> Call[RatingRecorded]:
    """Rate image `index` of a job from 1 (bad) to 10 (excellent)."""
    message = RatingCreate.model_construct(score=score)
    path = f"{JOBS}/{job_id}/images/{index}/rating"
    return call(Request("POST", path, json=body(message)), RatingRecorded)


# --- text jobs -----------------------------------------------------------------------


def models() -> Call[list[str]]:
    """Names of the text models gateways serve now."""
    return Call(
        Request("GET", "/v1/models"),
        lambda content: [model.id for model in ModelList.model_validate_json(content).data],
    )


def submit_text(params: TextParams, idempotency_key: str | None = None) -> Call[TextJobCreated]:
    """Queue a text job (chat or completion)."""
    request = Request("POST", TEXT_JOBS, json=_params(params), headers=_idempotent(idempotency_key))
    return call(request, TextJobCreated)


def text_job(job_id: str) -> Call[TextStatus]:
    """A text job's status now (its text so far included)."""
    return call(Request("GET", f"{TEXT_JOBS}/{job_id}"), TextStatus)


def cancel_text(job_id: str) -> Call[JobCancelled]:
    """Cancel a queued or running text job; its reserved kudos are refunded."""
    return call(Request("POST", f"{TEXT_JOBS}/{job_id}/cancel"), JobCancelled)


def _params(params: ImageParams | TextParams) -> dict[str, object]:
    return params.model_dump(mode="json", exclude_none=True)
