"""Ed25519 identities and signatures over canonical JSON bytes.

Workers sign what they submit; the coordinator verifies with the public key the worker
registered. Keys and signatures travel as lowercase hex. Block servers sign their peer-id
proof with their libp2p key instead (protocol.peer_ids verifies it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.errors import SignatureInvalid
from protocol.params import ImageParams
from protocol.text import TextParams

__all__ = [
    "Identity",
    "account_binding",
    "canonical_json",
    "params_hash",
    "peer_proof_message",
    "registration_message",
    "result_message",
    "sha256_hex",
    "text_result_message",
    "verify",
]


def canonical_json(value: Any) -> bytes:
    """The one byte form we sign: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def params_hash(params: ImageParams | TextParams) -> str:
    """Hash of the exact parameters a worker was given (seed included)."""
    return sha256_hex(canonical_json(params.model_dump(mode="json")))


def result_message(job_id: str, params_digest: str, image_digest: str) -> bytes:
    """What a worker signs for each image it submits."""
    return canonical_json(
        {
            "domain": "idlegrid/result/v1",
            "job": job_id,
            "params": params_digest,
            "image": image_digest,
        }
    )


def text_result_message(
    job_id: str,
    params_digest: str,
    text: str,
    spans: list[dict[str, Any]],
    checks: list[dict[str, Any]] | None = None,
) -> bytes:
    """What a text gateway signs: the job, its exact parameters, the text, who served it
    and (when it made any) its spot checks of the servers."""
    body: dict[str, Any] = {
        "domain": "idlegrid/text-result/v1",
        "job": job_id,
        "params": params_digest,
        "text": sha256_hex(text.encode()),
        "spans": spans,
    }
    if checks:
        body["checks"] = checks
    return canonical_json(body)


def account_binding(api_key: str | None) -> str:
    """What a worker's registration signs about the account it binds to: a hash of the API
    key it sends (never the key itself), or "" for no key (its own earnings account).
    The coordinator computes the same from the key it receives, so a signed registration
    replayed with another API key does not verify."""
    if api_key is None:
        return ""
    return sha256_hex(b"idlegrid/account-binding/v1\0" + api_key.encode())


def registration_message(name: str, public_key: str, account: str, nonce: str) -> bytes:
    """What a worker signs to register: its name and key, the account its earnings go to
    (`account_binding`), and a single-use coordinator nonce (so it cannot be replayed)."""
    return canonical_json(
        {
            "domain": "idlegrid/register/v2",
            "name": name,
            "public_key": public_key,
            "account": account,
            "nonce": nonce,
        }
    )


def peer_proof_message(nonce: str, worker_id: str, peer_id: str) -> bytes:
    """What a block server signs with its libp2p key to link its peer id to its worker
    (verified against the peer id: protocol.peer_ids)."""
    return canonical_json(
        {"domain": "idlegrid/peer-proof/v1", "nonce": nonce, "worker": worker_id, "peer": peer_id}
    )


class Identity:
    """An Ed25519 key pair. Persisting it is the caller's job (protocol does no I/O)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> Identity:
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 private key is 32 bytes, got {len(raw)}")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_key(self) -> str:
        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return raw.hex()

    def sign(self, message: bytes) -> str:
        return self._key.sign(message).hex()


def verify(public_key: str, message: bytes, signature: str) -> None:
    """Raise SignatureInvalid unless `signature` is `public_key`'s over `message`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key))
        key.verify(bytes.fromhex(signature), message)
    except (ValueError, InvalidSignature) as exc:
        raise SignatureInvalid("signature does not verify against the worker's key") from exc
