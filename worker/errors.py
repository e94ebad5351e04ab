"""Errors raised by the worker.

    WorkerError                 base of every error the worker raises on purpose
    └── ModelError              the `--model` the operator gave cannot be used
        ├── UnsafeWeights       pickle-based weights (.ckpt, .bin, .pt, ...): never loaded
        ├── ModelNotFound       no usable model at that path, or not a model at all
        └── ModelConfigMissing  a single-file checkpoint without `--model-config DIR`
    ├── CoordinatorUnavailable  the coordinator cannot be reached or failed (retry later)
    ├── CoordinatorRejected     the coordinator refused a request (4xx): fix the request
    └── LeaseLost               the job is no longer leased to us (409): drop it

The model errors are the operator's to fix; each message names the value and the fix.
"""

from __future__ import annotations

__all__ = [
    "CoordinatorRejected",
    "CoordinatorUnavailable",
    "LeaseLost",
    "ModelConfigMissing",
    "ModelError",
    "ModelNotFound",
    "UnsafeWeights",
    "WorkerError",
]


class WorkerError(Exception):
    """Base class of the worker's errors."""


class ModelError(WorkerError):
    """The model the worker was told to serve cannot be used."""


class UnsafeWeights(ModelError):
    """The weights are in a pickle-based format, which can run code when loaded."""


class ModelNotFound(ModelError):
    """Nothing usable at the given path or hub id."""


class ModelConfigMissing(ModelError):
    """A single-file checkpoint needs a local diffusers config folder to be loaded offline."""


class CoordinatorUnavailable(WorkerError):
    """The coordinator could not be reached or answered 5xx; worth retrying."""


class CoordinatorRejected(WorkerError):
    """The coordinator refused a request with a 4xx status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"coordinator refused (HTTP {status}): {message}")
        self.status = status


class LeaseLost(WorkerError):
    """The job is no longer leased to this worker (expired and given to another)."""
