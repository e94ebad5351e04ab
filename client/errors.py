"""Errors the SDK raises.

ClientError                  base
├── ApiError                 the coordinator answered with an error (status, code, fields)
│   ├── AuthError            401/403: missing, wrong or unknown API key
│   ├── NotEnoughKudos       402: the request costs more than the balance allows
│   └── RateLimited          429: too many requests; `retry_after` seconds to wait
├── CoordinatorUnreachable   could not connect / the connection broke
├── WaitTimeout              waiting on a job, the coordinator did not answer for the wait
│                            timeout (restarts shorter than that are ridden out)
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
    "RateLimited",
    "WaitTimeout",
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


class RateLimited(ApiError):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: list[tuple[str, str]],
        retry_after: float = 1.0,
    ) -> None:
        super().__init__(status, code, message, fields)
        self.retry_after = retry_after


class CoordinatorUnreachable(ClientError):
    pass


class JobFailed(ClientError):
    def __init__(self, job_id: str, state: str, reason: str | None) -> None:
        super().__init__(f"job {job_id} {state}: {reason or 'no reason given'}")
        self.job_id = job_id
        self.state = state
        self.reason = reason


class WaitTimeout(ClientError):
    def __init__(self, job_id: str, seconds: float, cause: str) -> None:
        super().__init__(
            f"gave up waiting for job {job_id}: the coordinator did not answer for "
            f"{seconds:g} s (last: {cause}); the job may still run: ask for it again later "
            "by its id"
        )
        self.job_id = job_id
        self.seconds = seconds
