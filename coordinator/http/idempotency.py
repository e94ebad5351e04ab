"""The Idempotency-Key header of requests that move money: transfers (required) and job
submits (optional). A retry with the same key and body gets the first answer and changes
nothing (coordinator.db.request_keys)."""

from __future__ import annotations

import hashlib
import re
from typing import Literal, overload

from aiohttp import web
from pydantic import BaseModel

from coordinator.db.request_keys import Idempotent
from coordinator.errors import BadRequest
from coordinator.http.addresses import client_ip
from protocol.signing import canonical_json, sha256_hex

__all__ = ["IDEMPOTENCY_KEY", "header_key", "submit_key"]

IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
KEY_CHARS = "1-100 of A-Z a-z 0-9 _ . : -"


@overload
def header_key(request: web.Request, *, required: Literal[True]) -> str: ...
@overload
def header_key(request: web.Request, *, required: bool) -> str | None: ...
def header_key(request: web.Request, *, required: bool) -> str | None:
    """The request's Idempotency-Key (None when absent and not `required`); 400 when it
    is malformed, or absent and `required`."""
    key = request.headers.get("Idempotency-Key")
    if key is None and not required:
        return None
    if key is None or not IDEMPOTENCY_KEY.match(key):
        raise BadRequest(
            "send an Idempotency-Key header (1-100 letters, digits, '_', '.', ':', '-'), "
            "e.g. a fresh UUID per request, so a retry cannot pay twice",
            [("Idempotency-Key", ("is required: " if required else "") + KEY_CHARS)],
        )
    return key


def submit_key(request: web.Request, anonymous: bool, body: BaseModel) -> Idempotent | None:
    """The Idempotent of a job submit that sent a key: the key, scoped to the client's
    address for anonymous requests (they share one account, and one requester must not
    read another's job through a guessed key), and the digest of the route and body."""
    key = header_key(request, required=False)
    if key is None:
        return None
    if anonymous:
        scope = f"{client_ip(request) or ''}\n{key}".encode()
        key = "anon:" + hashlib.sha256(scope).hexdigest()
    digest = sha256_hex(
        canonical_json({"route": request.path, "body": body.model_dump(mode="json")})
    )
    return Idempotent(key, digest)
