"""The block server's libp2p key: its peer id, and the proof that the peer id is ours.

Left to itself p2pd makes a key that never leaves the daemon, so nothing could prove
owning the peer id. Instead the block server makes an Ed25519 key here, hands it to p2pd
in an identity file (read once at start-up, then deleted) and keeps it to sign the
coordinator's challenge (`CoordinatorLink.link_peer`): a squatter who copies the peer id
from the DHT cannot sign for it. A fresh key per start, as p2pd would make.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.peer_ids import ED25519, encode_key, peer_id_of

__all__ = ["PeerKey"]


class PeerKey:
    """An Ed25519 libp2p key: `peer_id`, `sign`, and `identity_file` for p2pd."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self._public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = peer_id_of(encode_key(ED25519, self._public))

    @classmethod
    def generate(cls) -> PeerKey:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> str:
        """Hex signature over `message`, as libp2p's Ed25519 keys sign."""
        return self._key.sign(message).hex()

    @contextlib.contextmanager
    def identity_file(self) -> Iterator[Path]:
        """The key as p2pd reads it (`P2P.create(identity_path=...)`), in a directory only
        this user can read, deleted on exit (p2pd reads it once at start-up)."""
        seed = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        # libp2p's Ed25519 private key data: the 32-byte seed, then the public key
        encoded = encode_key(ED25519, seed + self._public)
        with tempfile.TemporaryDirectory(prefix="idlegrid-p2p-") as folder:  # mode 0700
            path = Path(folder) / "identity.key"
            path.touch(mode=0o600)
            path.write_bytes(encoded)
            yield path
