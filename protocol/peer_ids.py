"""libp2p peer ids, and checking that a signature comes from the key behind one.

A peer id is the base58 of a multihash of the peer's public key, encoded as the libp2p
`PublicKey` protobuf (type, data). Keys of up to 42 encoded bytes (Ed25519, the key p2pd
makes by default: ids `12D3KooW...`) are embedded whole (identity multihash); longer
ones (RSA, which hivemind's `P2P.generate_identity` makes: ids `Qm...`) are hashed
(sha2-256), and whoever proves such an id must send the key. Spec:
https://github.com/libp2p/specs/blob/master/peer-ids/peer-ids.md
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from protocol.errors import SignatureInvalid

__all__ = ["ED25519", "RSA", "encode_key", "peer_id_of", "verify_peer_signature"]

# libp2p KeyType values
RSA = 0
ED25519 = 1

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_IDENTITY, _SHA2_256 = 0x00, 0x12
# encoded keys up to this size are embedded in the peer id, longer ones hashed
_MAX_INLINE_KEY = 42


def encode_key(key_type: int, data: bytes) -> bytes:
    """The libp2p `PublicKey`/`PrivateKey` protobuf: field 1 the type, field 2 the data."""
    return b"\x08" + _varint(key_type) + b"\x12" + _varint(len(data)) + data


def peer_id_of(encoded_public_key: bytes) -> str:
    """The peer id of a key encoded with `encode_key`."""
    if len(encoded_public_key) <= _MAX_INLINE_KEY:
        digest = encoded_public_key
        multihash = bytes([_IDENTITY]) + _varint(len(digest)) + digest
    else:
        multihash = bytes([_SHA2_256, 32]) + hashlib.sha256(encoded_public_key).digest()
    return _b58encode(multihash)


def verify_peer_signature(
    peer_id: str, message: bytes, signature: str, public_key: str | None = None
) -> None:
    """Raise SignatureInvalid unless `signature` (hex) over `message` was made with the
    private key behind `peer_id`. `public_key` (hex of the encoded key) is needed only
    for peer ids that hash their key (RSA), and must then hash to the id."""
    encoded = _public_key_of(peer_id, None if public_key is None else _hex(public_key, "key"))
    key_type, data = _decode_key(encoded)
    raw_signature = _hex(signature, "signature")
    try:
        if key_type == ED25519:
            Ed25519PublicKey.from_public_bytes(data).verify(raw_signature, message)
        elif key_type == RSA:
            rsa = serialization.load_der_public_key(data)
            if not isinstance(rsa, RSAPublicKey):
                raise SignatureInvalid("the RSA peer key is not an RSA public key")
            rsa.verify(raw_signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise SignatureInvalid(
                f"peer id {peer_id} has a key of type {key_type}; only Ed25519 and RSA "
                "peer ids are supported"
            )
    except (ValueError, InvalidSignature) as exc:
        raise SignatureInvalid(
            f"the peer signature was not made with the private key of peer id {peer_id}"
        ) from exc


def _public_key_of(peer_id: str, public_key: bytes | None) -> bytes:
    try:
        code, rest = _read_varint(_b58decode(peer_id))
        length, digest = _read_varint(rest)
    except ValueError:
        raise SignatureInvalid(f"{peer_id!r} is not a libp2p peer id") from None
    if len(digest) != length:
        raise SignatureInvalid(f"{peer_id!r} is not a libp2p peer id (truncated multihash)")
    if code == _IDENTITY:
        if public_key is not None and public_key != digest:
            raise SignatureInvalid(f"peer_public_key is not the key embedded in {peer_id}")
        return digest
    if code == _SHA2_256 and length == 32:
        if public_key is None:
            raise SignatureInvalid(
                f"peer id {peer_id} is a hash of its public key: send the key "
                "(libp2p-encoded, hex) in peer_public_key"
            )
        if hashlib.sha256(public_key).digest() != digest:
            raise SignatureInvalid(f"peer_public_key does not hash to peer id {peer_id}")
        return public_key
    raise SignatureInvalid(f"peer id {peer_id} uses multihash code {code:#x}; not supported")


def _decode_key(encoded: bytes) -> tuple[int, bytes]:
    try:
        if encoded[:1] != b"\x08":
            raise ValueError("no key type")
        key_type, rest = _read_varint(encoded[1:])
        if rest[:1] != b"\x12":
            raise ValueError("no key data")
        length, data = _read_varint(rest[1:])
        if len(data) != length:
            raise ValueError("truncated key data")
    except ValueError as exc:
        raise SignatureInvalid(f"malformed libp2p public key: {exc}") from None
    return key_type, data


def _hex(text: str, what: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise SignatureInvalid(f"the peer {what} is not hex") from None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes) -> tuple[int, bytes]:
    value = 0
    for i, byte in enumerate(data[:9]):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, data[i + 1 :]
    raise ValueError("bad varint")


def _b58encode(raw: bytes) -> str:
    number = int.from_bytes(raw, "big")
    out = ""
    while number:
        number, digit = divmod(number, 58)
        out = _ALPHABET[digit] + out
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + out


def _b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        digit = _ALPHABET.find(char)
        if digit < 0:
            raise ValueError(f"{char!r} is not a base58 digit")
        number = number * 58 + digit
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return b"\0" * (len(text) - len(text.lstrip("1"))) + raw
