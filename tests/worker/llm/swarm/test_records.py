"""DHT announcements: only well-formed records signed by their owner are read back."""

from __future__ import annotations

import asyncio
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
from worker.llm.swarm.placement import choose_blocks, coverage
from worker.llm.swarm.records import (
    Announcer,
    ServerRecord,
    ServerState,
    parse_record,
    read_records,
    servers_key,
)

PEER = "12D3KooWQ9xQwRiKe8ZtRLv99GPx2LgkQ1WDsxEfD4kQAPugpCop"
OWNER = b"[owner:ssh-rsa AAAAB3NzaC1yc2E]"


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
        "version": 1,
    }
    value.update(changes)
    return value


def test_a_well_formed_record_parses() -> None:
    record = parse_record(PEER.encode() + OWNER, _value(), num_blocks=4)
    assert record == ServerRecord(PEER, 0, 2, 4, 64, 100.0, 1024, ServerState.ONLINE)
    assert parse_record(PEER.encode() + OWNER, record.to_value()) == record


@pytest.mark.parametrize(
    ("subkey", "value"),
    [
        pytest.param(PEER.encode(), _value(), id="subkey without an owner key (unsigned)"),
        pytest.param(PEER, _value(), id="subkey not bytes"),
        pytest.param(b"12D3KooWsomeoneElse1234567" + OWNER, _value(), id="another peer's id"),
        pytest.param(PEER.encode() + OWNER, _value(extra=1), id="unknown field"),
        pytest.param(PEER.encode() + OWNER, {"peer_id": PEER}, id="missing fields"),
        pytest.param(PEER.encode() + OWNER, _value(start=2, end=2), id="start == end"),
        pytest.param(PEER.encode() + OWNER, _value(start=3, end=1), id="start > end"),
        pytest.param(PEER.encode() + OWNER, _value(end=5), id="beyond the model"),
        pytest.param(PEER.encode() + OWNER, _value(start=-1), id="negative start"),
        pytest.param(PEER.encode() + OWNER, _value(start="0"), id="string start"),
        pytest.param(PEER.encode() + OWNER, _value(start=True), id="bool start"),
        pytest.param(PEER.encode() + OWNER, _value(state="dancing"), id="unknown state"),
        pytest.param(PEER.encode() + OWNER, _value(version=2), id="unknown version"),
        pytest.param(PEER.encode() + OWNER, _value(throughput=-1.0), id="negative throughput"),
        pytest.param(PEER.encode() + OWNER, [1, 2], id="not a map"),
    ],
)
def test_malformed_records_are_ignored(subkey: object, value: object) -> None:
    assert parse_record(subkey, value) is None


def test_a_record_for_a_model_of_another_size_is_ignored() -> None:
    assert parse_record(PEER.encode() + OWNER, _value(), num_blocks=3) is None


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


class _BogusSignature(RecordValidatorBase):
    """What a forger can do without the owner's private key: attach a made-up signature."""

    def validate(self, record: DHTRecord) -> bool:
        return True

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value + b"[signature:" + b"A" * 64 + b"]"


class _Blind(RecordValidatorBase):
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


async def test_forged_and_malformed_records_are_ignored_valid_ones_seen(dhts: list[DHT]) -> None:
    model, num_blocks = "forge-test", 4
    honest_key = RSASignatureValidator(RSAPrivateKey())
    honest = await start_dht(
        initial_peers=(),
        host_maddrs=("/ip4/127.0.0.1/tcp/0",),
        client_mode=False,
        validator=honest_key,
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
    assert await Announcer(honest, honest_key, model).announce(good, ttl=60)

    key, expires = servers_key(model), get_dht_time() + 60
    victim_subkey = str(honest.peer_id).encode() + honest_key.local_public_key
    forged = {**good.to_value(), "start": 2, "end": 4}
    # a record in the honest server's name, not signed with its key
    await forger.store(key, forged, expires, subkey=victim_subkey, return_future=True)
    # an unprotected record (no owner key in the subkey)
    other = ServerRecord(str(forger.peer_id), 2, 4, num_blocks, 64, 50.0, 512, ServerState.ONLINE)
    await forger.store(
        key, other.to_value(), expires, subkey=str(forger.peer_id).encode(), return_future=True
    )
    # correctly signed by its owner, but malformed
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
