"""Errors the SDK raises.

ClientError                  base
├── ApiError                 the coordinator answered with an error (status, code, fields)
│   ├── AuthError            401/403: missing, wrong or unknown API key
│   └── NotEnoughKudos       402: the request costs more than the balance allows
├── CoordinatorUnreachable   could not connect / the connection broke
└── JobFailed                the job ended failed or cancelled
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "AuthError",
    "ClientError",
    "CoordinatorUnreachable",
    "JobFailed",
    "NotEnoughKudos",
]


class ClientError(Exception):
    """Base class of the SDK's errors."""


class ApiError(ClientError):
    def __init__(self, status: int, code: str, message: str, fields: list[tuple[str, str]]) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields


class AuthError(ApiError):
    pass


class NotEnoughKudos(ApiError):
    pass


class CoordinatorUnreachable(ClientError):
    pass


class JobFailed(ClientError):
    def __init__(self, job_id: str, state: str, reason: str | None) -> None:
        super().__init__(f"job {job_id} {state}: {reason or 'no reason given'}")
        self.job_id = job_id
        self.state = state
        self.reason = reason
