"""Signed announcements of block servers in the hivemind DHT.

Every server of a model stores one record under the model's key, `idlegrid.MODEL.servers`,
in its own subkey: its peer id followed by `[owner:RSA public key]`. hivemind's
`RSASignatureValidator` then requires the value to be signed with that key (every DHT peer
of idlegrid runs it), so only the owner can write or refresh its
record, and the signature covers the expiration time. Records expire after `ttl` seconds
(30 by default) unless the server refreshes them; a stopping server announces itself
offline.

Readers trust nothing else: `parse_record` ignores any entry whose subkey is not
`PEER_ID[owner:...]` naming the record's own peer, whose value has missing, unknown or
mistyped fields, or whose blocks are outside the model. (hivemind's `SchemaValidator`
is written for pydantic v1 models keyed by fixed field names, which fits neither these
per-model keys nor this project's pydantic 2; the structure is checked here instead.)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

__all__ = [
    "RECORD_VERSION",
    "Announcer",
    "ServerRecord",
    "ServerState",
    "parse_record",
    "read_records",
    "servers_key",
]

log = logging.getLogger(__name__)

RECORD_VERSION = 1
# libp2p peer ids in base58 (no 0, O, I, l)
_SUBKEY = re.compile(rb"([1-9A-HJ-NP-Za-km-z]{20,100})\[owner:[^\]]+\]")


class ServerState(StrEnum):
    JOINING = "joining"  # loading or measuring; not routable yet
    ONLINE = "online"  # serving
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

    def to_value(self) -> dict[str, Any]:
        value = asdict(self)
        value["state"] = str(self.state)
        return value


_FIELDS: dict[str, tuple[type, ...]] = {
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


def parse_record(
    subkey: object, value: object, num_blocks: int | None = None
) -> ServerRecord | None:
    """The record in one DHT entry, or None if it is not a well-formed, owned record.

    With `num_blocks`, records for a model of another size are refused too.
    """
    if not isinstance(subkey, bytes) or not isinstance(value, Mapping):
        return None
    match = _SUBKEY.fullmatch(subkey)
    if match is None or set(value) != set(_FIELDS):
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
    if value["hidden_size"] <= 0 or value["throughput"] < 0 or value["cache_tokens"] < 0:
        return None
    return ServerRecord(
        peer_id=value["peer_id"],
        start=start,
        end=end,
        num_blocks=total,
        hidden_size=value["hidden_size"],
        throughput=float(value["throughput"]),
        cache_tokens=value["cache_tokens"],
        state=state,
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
    """Writes one server's signed record for one model."""

    def __init__(self, dht: DHT, validator: RSASignatureValidator, model: str) -> None:
        self._dht = dht
        self._model = model
        self._subkey = str(dht.peer_id).encode() + validator.local_public_key

    async def announce(self, record: ServerRecord, ttl: float) -> bool:
        """Store `record` for `ttl` seconds; False if no DHT peer accepted it."""
        stored = await self._dht.store(
            servers_key(self._model),
            record.to_value(),
            expiration_time=get_dht_time() + ttl,
            subkey=self._subkey,
            return_future=True,
        )
        return bool(stored)
