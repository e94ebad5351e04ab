"""DHT announcements: only well-formed records signed by the peer they describe are read back."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from worker.llm.swarm.dht import start_dht, stop_dht
from worker.llm.swarm.peer_proof import PeerKey
from worker.llm.swarm.placement import choose_blocks, coverage
from worker.llm.swarm.records import (
    MAX_THROUGHPUT,
    RECORD_VERSION,
    Announcer,
    ServerRecord,
    ServerState,
    owner_message,
    parse_record,
    read_records,
    servers_key,
)

PEER_KEY = PeerKey.generate()
PEER = PEER_KEY.peer_id
OWNER_KEY = RSAPrivateKey().get_public_key().to_bytes()
OWNER = b"[owner:" + OWNER_KEY + b"]"
SUBKEY = PEER.encode() + OWNER
PROOF = PEER_KEY.sign(owner_message(PEER, OWNER_KEY))
# someone else's keys
OTHER_KEY = PeerKey.generate()
OTHER_OWNER = b"[owner:" + RSAPrivateKey().get_public_key().to_bytes() + b"]"


def _value(**changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "peer_id": PEER,
        "start": 0,
        "end": 2,
        "num_blocks": 4,
        "hidden_size": 64,
        "throughput": 100.0,
        "cache_tokens": 1024,
        "state": "online",
        "version": RECORD_VERSION,
        "owner_proof": PROOF,
    }
    value.update(changes)
    return value


def test_a_well_formed_record_parses() -> None:
    record = parse_record(SUBKEY, _value(), num_blocks=4)
    assert record == ServerRecord(PEER, 0, 2, 4, 64, 100.0, 1024, ServerState.ONLINE)
    assert parse_record(SUBKEY, {**record.to_value(), "owner_proof": PROOF}) == record
    # at the cap, and 0 while joining (not measured yet)
    assert parse_record(SUBKEY, _value(throughput=MAX_THROUGHPUT)) is not None
    assert parse_record(SUBKEY, _value(throughput=0.0, state="joining")) is not None


@pytest.mark.parametrize(
    ("subkey", "value"),
    [
        pytest.param(PEER.encode(), _value(), id="subkey without an owner key (unsigned)"),
        pytest.param(PEER, _value(), id="subkey not bytes"),
        pytest.param(OTHER_KEY.peer_id.encode() + OWNER, _value(), id="another peer's id"),
        pytest.param(SUBKEY, _value(extra=1), id="unknown field"),
        pytest.param(SUBKEY, {"peer_id": PEER}, id="missing fields"),
        pytest.param(SUBKEY, _value(start=2, end=2), id="start == end"),
        pytest.param(SUBKEY, _value(start=3, end=1), id="start > end"),
        pytest.param(SUBKEY, _value(end=5), id="beyond the model"),
        pytest.param(SUBKEY, _value(start=-1), id="negative start"),
        pytest.param(SUBKEY, _value(start="0"), id="string start"),
        pytest.param(SUBKEY, _value(start=True), id="bool start"),
        pytest.param(SUBKEY, _value(state="dancing"), id="unknown state"),
        pytest.param(SUBKEY, _value(version=1), id="old version (no owner proof)"),
        pytest.param(SUBKEY, _value(throughput=-1.0), id="negative throughput"),
        pytest.param(SUBKEY, _value(throughput=math.inf), id="infinite throughput"),
        pytest.param(SUBKEY, _value(throughput=math.nan), id="NaN throughput"),
        pytest.param(SUBKEY, _value(throughput=MAX_THROUGHPUT * 2), id="throughput past the cap"),
        pytest.param(SUBKEY, _value(throughput=0.0), id="online with zero throughput"),
        pytest.param(SUBKEY, [1, 2], id="not a map"),
        # the owner key must be one the peer vouched for
        pytest.param(PEER.encode() + OTHER_OWNER, _value(), id="VICTIM[owner:ATTACKER]"),
        pytest.param(
            SUBKEY,
            _value(owner_proof=OTHER_KEY.sign(owner_message(PEER, OWNER_KEY))),
            id="proof signed by another peer key",
        ),
        pytest.param(SUBKEY, _value(owner_proof="00" * 64), id="bogus proof"),
        pytest.param(SUBKEY, _value(owner_proof="not hex"), id="proof not hex"),
        pytest.param(SUBKEY, _value(owner_proof=1), id="proof not a string"),
        pytest.param(SUBKEY, _value(owner_proof="ab" * 4096), id="huge proof"),
    ],
)
def test_malformed_records_are_ignored(subkey: object, value: object) -> None:
    assert parse_record(subkey, value) is None


def test_a_record_for_a_model_of_another_size_is_ignored() -> None:
    assert parse_record(SUBKEY, _value(), num_blocks=3) is None


@pytest.mark.parametrize(
    ("num_blocks", "length", "cover", "expected"),
    [
        (4, 2, [0.0, 0.0, 0.0, 0.0], (0, 2)),  # empty swarm: from the start
        (4, 2, [5.0, 5.0, 0.0, 0.0], (2, 4)),  # fill the hole
        (4, 2, [0.0, 0.0, 5.0, 5.0], (0, 2)),
        (4, 4, [5.0, 5.0, 0.0, 0.0], (0, 4)),  # all blocks: only one choice
        (6, 2, [9.0, 3.0, 3.0, 9.0, 1.0, 9.0], (3, 5)),  # the weakest block first
        (6, 2, [9.0, 1.0, 2.0, 1.0, 9.0, 9.0], (1, 3)),  # then the next weakest; ties: lowest
        (5, 1, [3.0, 2.0, 1.0, 2.0, 3.0], (2, 3)),
    ],
)
def test_choose_blocks_picks_the_weakest_range(
    num_blocks: int, length: int, cover: list[float], expected: tuple[int, int]
) -> None:
    assert choose_blocks(num_blocks, length, cover) == expected


def test_choose_blocks_rejects_impossible_lengths() -> None:
    with pytest.raises(ValueError, match="span_length must be within 1..4"):
        choose_blocks(4, 5, [0.0] * 4)
    with pytest.raises(ValueError, match="coverage has 3 entries for 4 blocks"):
        choose_blocks(4, 2, [0.0] * 3)


def test_coverage_sums_throughput_of_live_servers() -> None:
    records = [
        ServerRecord(PEER, 0, 2, 4, 64, 10.0, 0, ServerState.ONLINE),
        ServerRecord(PEER, 1, 3, 4, 64, 5.0, 0, ServerState.ONLINE),
        ServerRecord(PEER, 3, 4, 4, 64, 0.0, 0, ServerState.JOINING),  # not measured yet
        ServerRecord(PEER, 0, 4, 4, 64, 99.0, 0, ServerState.OFFLINE),
    ]
    assert coverage(records, 4) == [10.0, 15.0, 5.0, 10.0]
    assert coverage(records[2:], 4) == [0.0, 0.0, 0.0, 1.0]


# -- through a real DHT ---------------------------------------------------------------------


class _BogusSignature(RecordValidatorBase):  # type: ignore[misc]  # hivemind is untyped
    """What a forger can do without the owner's private key: attach a made-up signature."""

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        value: bytes = record.value
        return value + b"[signature:" + b"A" * 64 + b"]"


class _Blind(RecordValidatorBase):  # type: ignore[misc]  # hivemind is untyped
    """A reader that checks no signature: it sees whatever the DHT holds."""

    def validate(self, record: DHTRecord) -> bool:
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        return re.sub(rb"\[signature:.+?\]", b"", record.value)


async def _dht(initial: list[str] | None, validators: list[RecordValidatorBase], **kw: Any) -> DHT:
    dht = DHT(
        initial_peers=initial,
        start=False,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        nat_port_map=False,
        record_validators=validators,
        **kw,
    )
    dht.start()
    await asyncio.to_thread(dht.wait_until_ready, 30)
    return dht


@pytest.fixture
async def dhts() -> AsyncIterator[list[DHT]]:
    started: list[DHT] = []
    try:
        yield started
    finally:
        for dht in started:
            await stop_dht(dht)


@pytest.mark.slow
async def test_forged_and_malformed_records_are_ignored_valid_ones_seen(dhts: list[DHT]) -> None:
    model, num_blocks = "forge-test", 4
    honest_key = RSASignatureValidator(RSAPrivateKey())
    honest_peer_key = PeerKey.generate()
    with honest_peer_key.identity_file() as identity_path:
        honest = await start_dht(
            initial_peers=(),
            host_maddrs=("/ip4/127.0.0.1/tcp/0",),
            client_mode=False,
            validator=honest_key,
            identity_path=identity_path,
        )
    dhts.append(honest)
    peers = [str(maddr) for maddr in honest.get_visible_maddrs()]
    sloppy_key = RSASignatureValidator(RSAPrivateKey())
    sloppy = await _dht(peers, [sloppy_key])  # signs its records, but writes garbage in them
    forger = await _dht(peers, [_BogusSignature()])
    reader = await _dht(peers, [RSASignatureValidator(RSAPrivateKey())], client_mode=True)
    blind = await _dht(peers, [_Blind()], client_mode=True)
    dhts.extend([sloppy, forger, reader, blind])

    good = ServerRecord(str(honest.peer_id), 0, 2, num_blocks, 64, 50.0, 512, ServerState.ONLINE)
    announcer = Announcer(honest, honest_key, model, honest_peer_key)
    assert await announcer.announce(good, ttl=60)

    key, expires = servers_key(model), get_dht_time() + 60
    victim_subkey = announcer.subkey
    forged = {**announcer.value(good), "start": 2, "end": 4}
    # a record in the honest server's name, not signed with its key
    await forger.store(key, forged, expires, subkey=victim_subkey, return_future=True)
    # an unprotected record (no owner key in the subkey)
    other = ServerRecord(str(forger.peer_id), 2, 4, num_blocks, 64, 50.0, 512, ServerState.ONLINE)
    await forger.store(
        key, other.to_value(), expires, subkey=str(forger.peer_id).encode(), return_future=True
    )
    # correctly signed by its owner, but malformed (and the owner is not vouched for)
    sloppy_subkey = str(sloppy.peer_id).encode() + sloppy_key.local_public_key
    bad = {**other.to_value(), "peer_id": str(sloppy.peer_id), "start": 3, "end": 3}
    assert await sloppy.store(key, bad, expires, subkey=sloppy_subkey, return_future=True)

    # the forged entries are really in the DHT: a reader that checks nothing sees them...
    raw = await blind.get(key, latest=True, return_future=True)
    assert raw is not None
    raw_subkeys = set(raw.value)
    assert str(forger.peer_id).encode() in raw_subkeys
    assert sloppy_subkey in raw_subkeys
    assert raw.value[victim_subkey].value["start"] == 2  # the forgery outlives the original

    # ...while an idlegrid reader sees exactly the honest record
    records = await read_records(reader, model, num_blocks)
    assert records == [good]

    # and the forger cannot overwrite the honest record either
    honest_view = await read_records(honest, model, num_blocks)
    assert honest_view == [good]
