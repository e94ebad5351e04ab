"""Errors raised by the protocol package.

ProtocolError                 base of everything raised here
├── ValidationFailed          the caller sent bad input (names the field and the fix)
└── SignatureInvalid          a signature does not match the signed bytes or the key
"""

from __future__ import annotations

__all__ = ["ProtocolError", "SignatureInvalid", "ValidationFailed"]


class ProtocolError(Exception):
    """Base class of the protocol package's errors."""


class ValidationFailed(ProtocolError):
    """Input broke rules; each `(field, message)` pair says where and how to fix it."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        if not problems:
            raise ValueError("ValidationFailed needs at least one problem")
        super().__init__("; ".join(f"{field}: {message}" for field, message in problems))
        self.problems = problems

    @property
    def field(self) -> str:
        """The first offending field."""
        return self.problems[0][0]


class SignatureInvalid(ProtocolError):
    """A signature failed verification (wrong key, tampered bytes or malformed)."""
