"""Errors raised by the worker.

    WorkerError                 base of every error the worker raises on purpose
    ├── ModelError              the `--model` the operator gave cannot be used
    │   ├── UnsafeWeights       pickle-based weights (.ckpt, .bin, .pt, ...): never loaded
    │   ├── ModelNotFound       no usable model at that path, or not a model at all
    │   ├── ModelConfigMissing  a single-file checkpoint without `--model-config DIR`
    │   ├── UnsupportedArchitecture  an LLM family or image pipeline we do not serve
    │   │                       (names the supported)
    │   ├── BaselineConflict    `--baseline` names another family than the model's
    │   └── ConversionFailed    `idlegrid models smollm2` could not fetch, verify or convert
    ├── IdentityError           the identity file cannot be used (names the file and the fix)
    │   ├── IdentityInUse       another live process holds its lock
    │   └── IdentityFileInvalid the file does not hold a hex Ed25519 key (also a ValueError)
    ├── MissingExtra            an optional dependency is not installed (names the extra)
    ├── InvalidGenerationInput  bad sampling parameters (names the field)
    ├── CoordinatorUnavailable  the coordinator cannot be reached or failed (retry later)
    ├── CoordinatorRejected     the coordinator refused a request (4xx): fix the request
    ├── LeaseLost               the job is no longer leased to us (409): drop it
    ├── AdapterUnavailable      a job's LoRA or TI cannot be used here (`code`: AI Horde's
    │                           gen_metadata value: download_failed, baseline_mismatch,
    │                           parse_failed)
    └── SwarmError              the LLM swarm (worker/llm/swarm/)
        ├── MissingBlocks       no reachable server serves some blocks (retry later)
        ├── ServerFailed        one server failed or refused; the client routes around it
        └── SwarmStepFailed     a step still failed after the client's retry budget

The model errors are the operator's to fix; each message names the value and the fix.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "AdapterUnavailable",
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


# -- identity (worker/common/identity.py) ---------------------------------------------------


class AdapterUnavailable(WorkerError):
    """A LoRA or textual inversion of a job could not be resolved, fetched or verified
    (`download_failed`), or was made for another baseline (`baseline_mismatch`): that
    attempt fails with the reason, and the job goes to another worker."""

    def __init__(self, code: str, message: str, *, unreachable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        # CivitAI (its API or its files) could not be reached at all
        self.unreachable = unreachable


class IdentityError(WorkerError):
    """The identity file cannot be used; the message names the file and the fix."""


class IdentityInUse(IdentityError):
    """Another live process holds the identity file's lock."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"another idlegrid worker is using identity {path}; "
            "give this one another --name or --identity"
        )
        self.path = path


class IdentityFileInvalid(IdentityError, ValueError):
    """The identity file does not hold a hex Ed25519 private key."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"identity file {path} is not a hex Ed25519 key ({reason}); "
            "move it away to create a new identity (the worker's reputation starts over)"
        )
        self.path = path


__all__ += ["IdentityError", "IdentityFileInvalid", "IdentityInUse"]


# -- LLM gateway and blocks (worker/llm/) ---------------------------------------------
#
#     ModelError
#     └── UnsupportedArchitecture  config.json names a model family the LLM code cannot run
#     InvalidGenerationInput       the requester's messages, prompt or sampling parameters
#                                  are invalid (bad input: do not retry unchanged)


class UnsupportedArchitecture(ModelError):
    """The model's `model_type` is not one the LLM gateway and block servers can run, or
    the image model's pipeline (or a flag beside it) is not one the image engine serves."""


class BaselineConflict(ModelError):
    """`--baseline` names another family than the one the engine found in the model."""


class InvalidGenerationInput(WorkerError):
    """A generation request is invalid; `field` names the bad value, e.g. `messages[2].role`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


__all__ += ["BaselineConflict", "InvalidGenerationInput", "UnsupportedArchitecture"]


# -- LLM swarm (worker/llm/swarm/) ------------------------------------------------------


class SwarmError(WorkerError):
    """Base class of the LLM swarm's errors."""


class MissingBlocks(SwarmError):
    """No reachable server serves some blocks of the model; `ranges` lists them."""

    def __init__(
        self, model: str, ranges: list[tuple[int, int]], others: list[str] | None = None
    ) -> None:
        spans = ", ".join(f"{start}:{end}" for start, end in ranges)
        what = f"blocks {spans} of model {model}" if ranges else f"any blocks of model {model}"
        if others:
            # the usual cause: the servers and this client were given different names
            names = ", ".join(others)
            fix = (
                f"the swarm's peers serve model {names} instead: give the block servers and "
                f"this gateway the same --model-name (e.g. --model-name {others[0]}; the "
                "default is the model folder's name)"
            )
        else:
            fix = "start a block server for them (`idlegrid worker blocks`) or retry later"
        super().__init__(f"no server serves {what}; {fix}")
        self.model = model
        self.ranges = ranges
        # models the swarm's initial peers serve instead (a --model-name mismatch)
        self.others = others or []


class ServerFailed(SwarmError):
    """A block server failed, timed out or refused a request.

    `code` is the server's reason when it answered ("busy": its cache is full, "idle": it
    closed an idle session, "bad_request": we sent something wrong), else "failed".
    """

    def __init__(self, peer_id: str, message: str, code: str = "failed") -> None:
        super().__init__(f"block server {peer_id}: {message}")
        self.peer_id = peer_id
        self.code = code


class SwarmStepFailed(SwarmError):
    """A step kept failing on every route the client tried within its retry budget."""


__all__ += ["MissingBlocks", "ServerFailed", "SwarmError", "SwarmStepFailed"]


# -- model converters (worker/models/) -----------------------------------------------------


class ConversionFailed(ModelError):
    """A model to convert could not be downloaded, verified or converted."""


class MissingExtra(WorkerError):
    """An optional dependency is not installed; the message names the pip extra."""


__all__ += ["ConversionFailed", "MissingExtra"]
