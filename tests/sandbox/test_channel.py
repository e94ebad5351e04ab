"""The pipe framing, on in-memory streams."""

from __future__ import annotations

import asyncio
import io
import struct
from typing import Any

import pytest

from sandbox.channel import (
    CHILD_FRAMES,
    MAX_BLOBS,
    PARENT_FRAMES,
    ErrorFrame,
    InitFrame,
    Limits,
    ProgressFrame,
    RequestFrame,
    ResultFrame,
    ShutdownFrame,
    encode_frame,
    read_frame_async,
    read_frame_sync,
)
from sandbox.errors import ChannelClosed, ChannelError, FrameTooLarge

CAP = 1 << 20


def stream_of(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def test_child_frames_round_trip_in_order_with_blobs() -> None:
    blobs = [bytes(range(256)) * 10, b"", b"\x89PNG\r\n\x1a\n"]
    wire = b"".join(
        [
            encode_frame(ProgressFrame(id=7, data={"step": 1}), max_bytes=CAP),
            encode_frame(ResultFrame(id=7, data={"text": "é✓"}), blobs, max_bytes=CAP),
            encode_frame(ErrorFrame(id=None, error_type="E", message="m"), max_bytes=CAP),
        ]
    )
    reader = stream_of(wire)
    assert await read_frame_async(reader, CHILD_FRAMES, CAP) == (
        ProgressFrame(id=7, data={"step": 1}),
        [],
    )
    assert await read_frame_async(reader, CHILD_FRAMES, CAP) == (
        ResultFrame(id=7, data={"text": "é✓"}),
        blobs,
    )
    frame, _ = await read_frame_async(reader, CHILD_FRAMES, CAP)
    assert frame == ErrorFrame(id=None, error_type="E", message="m")
    with pytest.raises(ChannelClosed, match="pipe closed$"):
        await read_frame_async(reader, CHILD_FRAMES, CAP)


def test_parent_frames_round_trip_on_a_blocking_stream() -> None:
    init = InitFrame(
        engine="a.b:C",
        options={"model": "m"},
        limits=Limits(memory_bytes=None, cpu_seconds=5, open_files=64, file_size_bytes=None),
        max_frame_bytes=CAP,
    )
    request = RequestFrame(id=1, kind="txt2img", payload={"prompt": "a cat"})
    wire = b"".join(encode_frame(f, max_bytes=CAP) for f in (init, request, ShutdownFrame()))
    stream = io.BytesIO(wire)
    assert [read_frame_sync(stream, PARENT_FRAMES, CAP)[0] for _ in range(3)] == [
        init,
        request,
        ShutdownFrame(),
    ]
    with pytest.raises(ChannelClosed):
        read_frame_sync(stream, PARENT_FRAMES, CAP)


async def test_truncated_frame_is_channel_closed() -> None:
    wire = encode_frame(ResultFrame(id=1, data={}), [b"0123456789"], max_bytes=CAP)
    with pytest.raises(ChannelClosed, match="middle of a frame"):
        await read_frame_async(stream_of(wire[:-3]), CHILD_FRAMES, CAP)


def test_oversized_frame_is_refused_before_sending() -> None:
    with pytest.raises(FrameTooLarge, match="max_frame_bytes") as info:
        encode_frame(ResultFrame(id=1, data={}), [b"x" * 2000], max_bytes=1000)
    assert info.value.limit == 1000
    assert info.value.size > 2000


async def test_oversized_frame_is_refused_before_reading_its_body() -> None:
    # Announces a 1 GiB header and sends nothing more: no read may wait for that body.
    reader = stream_of(struct.pack(">II", 1 << 30, 0), eof=False)
    with pytest.raises(FrameTooLarge):
        await read_frame_async(reader, CHILD_FRAMES, CAP)
    big_blob = struct.pack(">II", 10, 1) + struct.pack(">Q", 1 << 40)
    with pytest.raises(FrameTooLarge):
        await read_frame_async(stream_of(big_blob, eof=False), CHILD_FRAMES, CAP)


async def test_too_many_blobs_is_a_channel_error() -> None:
    reader = stream_of(struct.pack(">II", 10, MAX_BLOBS + 1), eof=False)
    with pytest.raises(ChannelError, match="blobs"):
        await read_frame_async(reader, CHILD_FRAMES, CAP)


@pytest.mark.parametrize(
    "header",
    [
        b"not json",
        b'{"type":"nonsense"}',
        b'{"type":"result","id":"one","data":{}}',
        b'{"type":"result","id":1,"data":{},"extra":1}',
        b'{"type":"request","id":1,"kind":"k","payload":{}}',  # a parent frame
        b"\xff\xfe",
    ],
)
async def test_malformed_header_is_a_channel_error(header: bytes) -> None:
    wire = struct.pack(">II", len(header), 0) + header
    with pytest.raises(ChannelError, match="malformed frame header"):
        await read_frame_async(stream_of(wire), CHILD_FRAMES, CAP)


@pytest.mark.parametrize(
    ("data", "error"),
    [({"s": {1, 2}}, TypeError), ({"x": float("nan")}, ValueError), ({"b": b"raw"}, TypeError)],
)
def test_values_that_are_not_strict_json_fail_loudly(
    data: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        encode_frame(ResultFrame(id=1, data=data), max_bytes=CAP)
