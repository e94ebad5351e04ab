"""Signed announcements of block servers in the hivemind DHT.

Every server of a model stores one record under the model's key, `idlegrid.MODEL.servers`,
in its own subkey: its peer id followed by `[owner:RSA public key]`. hivemind's
`RSASignatureValidator` then requires the value to be signed with that key (every DHT peer
of idlegrid runs it), so only the owner can write or refresh its record, and the signature
covers the expiration time. Records expire after `ttl` seconds (30 by default) unless the
server refreshes them; a stopping server announces itself offline.

A valid signature only proves who wrote a record, not whom it describes: anyone can sign a
record in another peer's name with their own key (`VICTIM[owner:ATTACKER]`). So the peer
must vouch for its owner key: every value carries `owner_proof`, the signature of
`owner_message(peer id, owner key)` by the peer's libp2p key (`PeerKey`, the key its peer
id embeds, which libp2p also authenticates every connection to that peer with). An owner
key the peer never vouched for, or a proof copied from another subkey, does not verify.

Readers trust nothing else: `parse_record` ignores any entry whose subkey is not
`PEER_ID[owner:KEY]` with KEY vouched for by PEER_ID, whose value has missing, unknown or
mistyped fields, whose blocks are outside the model, or whose throughput is not a finite
number within `MAX_THROUGHPUT` (positive once online). (hivemind's `SchemaValidator` is
written for pydantic v1 models keyed by fixed field names, which fits neither these
per-model keys nor this project's pydantic 2; the structure is checked here instead.)
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from protocol.errors import SignatureInvalid
from protocol.peer_ids import verify_peer_signature
from worker.llm.swarm.peer_proof import PeerKey
from worker.llm.swarm.quant import QUANTS

__all__ = [
    "MAX_THROUGHPUT",
    "RECORD_VERSION",
    "Announcer",
    "ServerRecord",
    "ServerState",
    "owner_message",
    "parse_record",
    "read_records",
    "servers_key",
]

log = logging.getLogger(__name__)

# 2: owner_proof
RECORD_VERSION = 2
# Tokens per second through a span that a record may claim. One token per step through even
# one block takes a fraction of a millisecond of kernel launches on the fastest GPU; more is
# a lie, and an unbounded number (inf, NaN) would win every route or break the planner.
MAX_THROUGHPUT = 100_000.0
# libp2p peer ids in base58 (no 0, O, I, l), then the key hivemind checked the signature with
_SUBKEY = re.compile(rb"([1-9A-HJ-NP-Za-km-z]{20,100})\[owner:([^\]]+)\]")


class ServerState(StrEnum):
    JOINING = "joining"  # loading or measuring; not routable yet
    ONLINE = "online"  # serving
    LEAVING = "leaving"  # finishing open sessions before it stops; route new ones elsewhere
    OFFLINE = "offline"  # stopped on purpose; forget it


@dataclass(frozen=True)
class ServerRecord:
    """One block server's announcement for one model."""

    # the server's libp2p peer id (base58)
    peer_id: str
    # the blocks it serves: [start, end)
    start: int
    end: int
    # blocks in the whole model, and its hidden size (so clients can check they agree)
    num_blocks: int
    hidden_size: int
    # tokens per second through the whole span, one token per step, measured at startup
    throughput: float
    # attention-cache tokens still free for new sessions
    cache_tokens: int
    state: ServerState
    # of this record format
    version: int = RECORD_VERSION
    # weight quantization (worker.llm.swarm.quant): spot checks allow its noise
    quant: str = "none"

    def to_value(self) -> dict[str, Any]:
        value = asdict(self)
        value["state"] = str(self.state)
        if self.quant == "none":
            # readers before quantization want exactly the other fields
            del value["quant"]
        return value


_PROOF = "owner_proof"
# hex characters of an owner proof (an Ed25519 signature has 128)
_MAX_PROOF = 1024
_FIELDS: dict[str, tuple[type, ...]] = {
    _PROOF: (str,),
    "peer_id": (str,),
    "start": (int,),
    "end": (int,),
    "num_blocks": (int,),
    "hidden_size": (int,),
    "throughput": (float, int),
    "cache_tokens": (int,),
    "state": (str,),
    "version": (int,),
}


def servers_key(model: str) -> str:
    """The DHT key under which the servers of `model` announce themselves."""
    return f"idlegrid.{model}.servers"


def owner_message(peer_id: str, owner_key: bytes) -> bytes:
    """What a peer signs to vouch that `owner_key` (as in `[owner:...]`) writes its records."""
    return b"idlegrid dht owner\n" + peer_id.encode() + b"\n" + owner_key


@functools.lru_cache(maxsize=1024)
def _vouched(peer_id: str, owner_key: bytes, proof: str) -> bool:
    try:
        verify_peer_signature(peer_id, owner_message(peer_id, owner_key), proof)
    except (SignatureInvalid, ValueError):
        return False
    return True


def _valid_throughput(value: float, state: ServerState) -> bool:
    # (NaN fails every comparison, so it is refused here too)
    low_ok = value > 0 if state == ServerState.ONLINE else value >= 0
    return math.isfinite(value) and low_ok and value <= MAX_THROUGHPUT


def parse_record(
    subkey: object, value: object, num_blocks: int | None = None
) -> ServerRecord | None:
    """The record in one DHT entry, or None if it is not well-formed or its owner key is not
    vouched for by the peer it describes.

    With `num_blocks`, records for a model of another size are refused too.
    """
    if not isinstance(subkey, bytes) or not isinstance(value, Mapping):
        return None
    match = _SUBKEY.fullmatch(subkey)
    if match is None or set(value) - {"quant"} != set(_FIELDS):
        return None
    quant = value.get("quant", "none")
    if quant not in QUANTS:
        return None
    for name, types in _FIELDS.items():
        # bool is an int in Python; a record with true/false for a number is malformed
        if isinstance(value[name], bool) or not isinstance(value[name], types):
            return None
    if value["peer_id"].encode() != match.group(1) or value["version"] != RECORD_VERSION:
        return None
    try:
        state = ServerState(value["state"])
    except ValueError:
        return None
    start, end, total = value["start"], value["end"], value["num_blocks"]
    if not 0 <= start < end <= total or (num_blocks is not None and total != num_blocks):
        return None
    if value["hidden_size"] <= 0 or value["cache_tokens"] < 0:
        return None
    if not _valid_throughput(float(value["throughput"]), state):
        return None
    proof = value[_PROOF]
    if len(proof) > _MAX_PROOF or not _vouched(value["peer_id"], match.group(2), proof):
        return None  # signed, but by someone the peer it describes never vouched for
    return ServerRecord(
        peer_id=value["peer_id"],
        start=start,
        end=end,
        num_blocks=total,
        hidden_size=value["hidden_size"],
        throughput=float(value["throughput"]),
        cache_tokens=value["cache_tokens"],
        state=state,
        quant=quant,
    )


async def read_records(dht: DHT, model: str, num_blocks: int | None = None) -> list[ServerRecord]:
    """Every valid, unexpired record of `model` in the DHT (any state), one per peer."""
    found = await dht.get(servers_key(model), latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return []
    records: dict[str, ServerRecord] = {}
    now = get_dht_time()
    for subkey, entry in found.value.items():
        if entry.expiration_time < now:
            continue
        record = parse_record(subkey, entry.value, num_blocks)
        if record is None:
            log.debug("ignoring a malformed record for %s", model)
            continue
        records[record.peer_id] = record
    return sorted(records.values(), key=lambda record: (record.start, record.peer_id))


class Announcer:
    """Writes one server's signed record for one model.

    `validator` signs the records (hivemind's owner key); `peer_key`, the DHT's own libp2p
    key, vouches for it once.
    """

    def __init__(
        self, dht: DHT, validator: RSASignatureValidator, model: str, peer_key: PeerKey
    ) -> None:
        peer_id = str(dht.peer_id)
        if peer_key.peer_id != peer_id:
            raise ValueError(f"peer_key is {peer_key.peer_id}'s, not the DHT's ({peer_id})")
        self._dht = dht
        self._model = model
        self._subkey: bytes = peer_id.encode() + validator.local_public_key
        match = _SUBKEY.fullmatch(self._subkey)
        assert match is not None, "hivemind's owner marker changed"
        self._proof = peer_key.sign(owner_message(peer_id, match.group(2)))

    @property
    def subkey(self) -> bytes:
        return self._subkey

    def value(self, record: ServerRecord) -> dict[str, Any]:
        """What is stored for `record`: its fields and the owner proof."""
        return {**record.to_value(), _PROOF: self._proof}

    async def announce(self, record: ServerRecord, ttl: float) -> bool:
        """Store `record` for `ttl` seconds; False if no DHT peer accepted it."""
        stored = await self._dht.store(
            servers_key(self._model),
            self.value(record),
            expiration_time=get_dht_time() + ttl,
            subkey=self._subkey,
            return_future=True,
        )
        return bool(stored)
