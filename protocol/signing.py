"""Ed25519 identities and signatures over canonical JSON bytes.

Workers sign what they submit; the coordinator verifies with the public key the worker
registered. Keys and signatures travel as lowercase hex.
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
    "canonical_json",
    "params_hash",
    "peer_link_message",
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
    job_id: str, params_digest: str, text: str, spans: list[dict[str, Any]]
) -> bytes:
    """What a text gateway signs: the job, its exact parameters, the text and who served it."""
    return canonical_json(
        {
            "domain": "idlegrid/text-result/v1",
            "job": job_id,
            "params": params_digest,
            "text": sha256_hex(text.encode()),
            "spans": spans,
        }
    )


def peer_link_message(public_key: str, peer_id: str, timestamp: int) -> bytes:
    """What a block server signs to link its hivemind peer id to its worker identity."""
    return canonical_json(
        {"domain": "idlegrid/peer/v1", "public_key": public_key, "peer": peer_id, "ts": timestamp}
    )


def registration_message(name: str, public_key: str, timestamp: int) -> bytes:
    """What a worker signs to prove it holds the key it registers with."""
    return canonical_json(
        {"domain": "idlegrid/register/v1", "name": name, "public_key": public_key, "ts": timestamp}
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
