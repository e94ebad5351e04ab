"""Errors of the coordinator, each with the HTTP status it maps to (in `api.py`).

CoordinatorError                 base; status 500
├── BadRequest                   the caller's input is wrong (400); may list fields
│   ├── BodyTooLarge             body over the configured limit (413)
│   ├── BadImage                 an uploaded image is not a PNG of the job's size (400)
│   └── OutdatedWorker           a worker too old for signed challenges: upgrade it (400)
├── Unauthorized                 missing or unknown API key / worker token (401)
│   └── ChallengeRejected        a challenge nonce unknown, used or expired (401)
├── Forbidden                    authenticated, but not allowed (403)
│   └── WorkerPaused             the worker failed too many checks; it gets no jobs
├── NotFound                     no such job, image or account (404)
├── Conflict                     state does not allow it: name taken, job not leased
│                                to you, already finished (409)
├── InsufficientKudos            the request costs more than the balance allows (402)
├── RateLimited                  too many requests from this key or address (429)
├── JobFailed                    a job waited on in the request failed (502)
└── StoreUnavailable             the database failed underneath us (503)

LegacySchemaError                at start-up: the database predates the release the
                                 Alembic migrations take over from (no HTTP status)
"""

from __future__ import annotations

from protocol.version import VERSION

__all__ = [
    "BadImage",
    "BadRequest",
    "BodyTooLarge",
    "ChallengeRejected",
    "Conflict",
    "CoordinatorError",
    "Forbidden",
    "InsufficientKudos",
    "JobFailed",
    "LegacySchemaError",
    "NotFound",
    "OutdatedWorker",
    "RateLimited",
    "StoreUnavailable",
    "Unauthorized",
    "WorkerPaused",
]


class CoordinatorError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, fields: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or []
        # extra response headers (e.g. Retry-After)
        self.headers: dict[str, str] = {}
        # AI Horde's return code for /api/v2 callers, when the code's default does not fit
        self.rc: str | None = None

    def horde(self, rc: str) -> CoordinatorError:
        """This error with AI Horde's return code `rc` (coordinator.http.horde)."""
        self.rc = rc
        return self


class BadRequest(CoordinatorError):
    status = 400
    code = "bad_request"


class BodyTooLarge(BadRequest):
    status = 413
    code = "body_too_large"


class BadImage(BadRequest):
    code = "bad_image"


class Unauthorized(CoordinatorError):
    status = 401
    code = "unauthorized"


class Forbidden(CoordinatorError):
    status = 403
    code = "forbidden"


class WorkerPaused(Forbidden):
    code = "worker_paused"


class UnsandboxedWorker(Forbidden):
    """The coordinator runs with --require-sandbox and this worker's engine is not confined."""

    code = "unsandboxed_worker"

    def __init__(self) -> None:
        super().__init__(
            "this coordinator serves only workers whose engine runs confined "
            "(--require-sandbox): start the worker without --unsandboxed, on a machine "
            "where `idlegrid worker doctor` passes its sandbox check, and update it if it "
            "is older than 0.3",
            [("sandboxed", "must be true")],
        )


class NotFound(CoordinatorError):
    status = 404
    code = "not_found"


class Conflict(CoordinatorError):
    status = 409
    code = "conflict"


class InsufficientKudos(CoordinatorError):
    status = 402
    code = "insufficient_kudos"


class RateLimited(CoordinatorError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers["Retry-After"] = str(max(1, round(retry_after + 0.499)))


class StoreUnavailable(CoordinatorError):
    status = 503
    code = "store_unavailable"


class JobFailed(CoordinatorError):
    """A request that waits for its job (OpenAI-style) found the job failed."""

    status = 502
    code = "job_failed"


class LegacySchemaError(RuntimeError):
    """The database predates the release that the Alembic migrations take over from."""


class OutdatedWorker(BadRequest):
    """A worker that does not sign coordinator challenges (registration, peer-id proof)."""

    code = "outdated_worker"

    def __init__(self, what: str) -> None:
        super().__init__(
            f"this coordinator (idlegrid {VERSION}) needs a signed challenge with every "
            f"{what}, and the worker sent none: upgrade idlegrid on the worker to {VERSION}",
            [("nonce", "is required: get one from POST /api/v1/workers/challenge and sign it")],
        )


class ChallengeRejected(Unauthorized):
    """A signed challenge nonce is unknown, already used, expired or for another purpose."""

    code = "challenge_rejected"
