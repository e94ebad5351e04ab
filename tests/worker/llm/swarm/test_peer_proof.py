"""Peer-id proofs: the block server's own libp2p key runs p2pd, and the coordinator's check
(protocol.peer_ids) accepts a signature only from the key behind the peer id, for the
Ed25519 ids p2pd makes and the RSA ids of hivemind's `P2P.generate_identity`."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from protocol.errors import SignatureInvalid
from protocol.peer_ids import RSA, encode_key, verify_peer_signature
from protocol.signing import peer_proof_message
from worker.llm.swarm.dht import start_dht, stop_dht
from worker.llm.swarm.peer_proof import PeerKey

MESSAGE = peer_proof_message("ab" * 16, "worker-1", "peer")


@pytest.mark.slow
async def test_p2pd_runs_on_our_key_alone_or_joining_a_swarm() -> None:
    first_key, second_key = PeerKey.generate(), PeerKey.generate()
    with first_key.identity_file() as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        first = await start_dht(
            initial_peers=(),
            host_maddrs=("/ip4/127.0.0.1/tcp/0",),
            client_mode=False,
            validator=RSASignatureValidator(RSAPrivateKey()),
            identity_path=path,
        )
    assert not path.exists()  # p2pd read it at start-up; the key stays in memory only
    try:
        assert str(first.peer_id) == first_key.peer_id
        initial = tuple(str(m) for m in first.get_visible_maddrs())
        with second_key.identity_file() as path:
            second = await start_dht(
                initial_peers=initial,
                host_maddrs=("/ip4/127.0.0.1/tcp/0",),
                client_mode=False,
                validator=RSASignatureValidator(RSAPrivateKey()),
                identity_path=path,
            )
        try:
            assert str(second.peer_id) == second_key.peer_id
        finally:
            await stop_dht(second)
    finally:
        await stop_dht(first)


def test_an_ed25519_peer_id_accepts_only_its_own_keys_signature() -> None:
    key, other = PeerKey.generate(), PeerKey.generate()
    assert key.peer_id.startswith("12D3KooW")
    verify_peer_signature(key.peer_id, MESSAGE, key.sign(MESSAGE))
    with pytest.raises(SignatureInvalid, match="not made with the private key of peer id"):
        verify_peer_signature(key.peer_id, MESSAGE, other.sign(MESSAGE))
    with pytest.raises(SignatureInvalid):
        verify_peer_signature(key.peer_id, MESSAGE + b" ", key.sign(MESSAGE))
    with pytest.raises(SignatureInvalid, match="is not the key embedded"):
        verify_peer_signature(key.peer_id, MESSAGE, key.sign(MESSAGE), "08011220" + "00" * 32)
    with pytest.raises(SignatureInvalid, match="is not a libp2p peer id"):
        verify_peer_signature("1111", MESSAGE, key.sign(MESSAGE))


def _rsa_identity(tmp_path: Path) -> tuple[str, rsa.RSAPrivateKey]:
    """An identity as hivemind makes it, and the peer id hivemind computes for it."""
    path = tmp_path / "rsa.key"
    P2P.generate_identity(str(path))
    data = path.read_bytes()
    private = serialization.load_der_private_key(
        crypto_pb2.PrivateKey.FromString(data).data, password=None
    )
    assert isinstance(private, rsa.RSAPrivateKey)
    return PeerID.from_identity(data).to_base58(), private


def _encoded(key: rsa.RSAPublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return encode_key(RSA, der).hex()


def test_an_rsa_peer_id_needs_its_key_sent_and_accepts_only_it(tmp_path: Path) -> None:
    peer_id, private = _rsa_identity(tmp_path)
    assert peer_id.startswith("Qm")
    signature = private.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256()).hex()
    verify_peer_signature(peer_id, MESSAGE, signature, _encoded(private.public_key()))
    with pytest.raises(SignatureInvalid, match="send the key"):
        verify_peer_signature(peer_id, MESSAGE, signature)
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = impostor.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256()).hex()
    with pytest.raises(SignatureInvalid, match="does not hash to peer id"):
        verify_peer_signature(peer_id, MESSAGE, forged, _encoded(impostor.public_key()))
    with pytest.raises(SignatureInvalid, match="not made with the private key"):
        verify_peer_signature(peer_id, MESSAGE, forged, _encoded(private.public_key()))
