"""The one error of the typed client's own: a transport got no answer.

    TransportError   the request got no answer: the connection was refused, broke or went
                     silent (`sent`: whether the request may have reached the coordinator)

Answers with an error status are not errors here: each face turns them into its own typed
errors through its ErrorPolicy (client.api.core), the SDK into client.errors, the worker's
link into worker.errors.
"""

from __future__ import annotations

__all__ = ["TransportError"]


class TransportError(Exception):
    """No answer to a request. `sent` is False when the connection was refused, so the
    request cannot have reached the coordinator; True when it may have (a retry of a
    request that changes something then needs an Idempotency-Key)."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent
