"""Errors of the coordinator, each with the HTTP status it maps to (in `http.py`).

CoordinatorError                 base; status 500
├── BadRequest                   the caller's input is wrong (400); may list fields
│   └── BodyTooLarge             body over the configured limit (413)
├── Unauthorized                 missing or unknown API key / worker token (401)
├── Forbidden                    authenticated, but not yours (403)
├── NotFound                     no such job, image or account (404)
├── Conflict                     state does not allow it: name taken, job not leased
│                                to you, already finished (409)
├── InsufficientKudos            the request costs more than the balance allows (402)
└── StoreUnavailable             the database failed underneath us (503)
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "BodyTooLarge",
    "Conflict",
    "CoordinatorError",
    "Forbidden",
    "InsufficientKudos",
    "NotFound",
    "StoreUnavailable",
    "Unauthorized",
]


class CoordinatorError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, fields: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or []


class BadRequest(CoordinatorError):
    status = 400
    code = "bad_request"


class BodyTooLarge(BadRequest):
    status = 413
    code = "body_too_large"


class Unauthorized(CoordinatorError):
    status = 401
    code = "unauthorized"


class Forbidden(CoordinatorError):
    status = 403
    code = "forbidden"


class NotFound(CoordinatorError):
    status = 404
    code = "not_found"


class Conflict(CoordinatorError):
    status = 409
    code = "conflict"


class InsufficientKudos(CoordinatorError):
    status = 402
    code = "insufficient_kudos"


class StoreUnavailable(CoordinatorError):
    status = 503
    code = "store_unavailable"
