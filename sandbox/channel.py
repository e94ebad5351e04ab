"""Framing of the parent-child pipe: a typed JSON header plus raw binary blobs, no pickle.

One frame on the wire (integers big-endian):

    >I header_len  >I n_blobs  n_blobs x >Q blob_len  header (UTF-8 JSON)  blob_0 ... blob_n-1

The whole frame, prefix included, must fit in `max_frame_bytes`; the prefix is checked
before anything else is read, so a corrupted length is caught before it allocates.

Parent to child: `init` (once, first), `request`, `shutdown`.
Child to parent: `ready` or `error` (answering init), then per request any number of
`progress`, then one `result` or `error`. Only `request` and `result` carry blobs.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Sequence
from typing import Annotated, Any, BinaryIO, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from sandbox.errors import ChannelClosed, ChannelError, FrameTooLarge

__all__ = [
    "CHILD_FRAMES",
    "MAX_BLOBS",
    "MAX_INIT_BYTES",
    "PARENT_FRAMES",
    "PROTOCOL_VERSION",
    "ChildFrame",
    "ErrorFrame",
    "InitFrame",
    "Limits",
    "ParentFrame",
    "ProgressFrame",
    "ReadyFrame",
    "RequestFrame",
    "ResultFrame",
    "ShutdownFrame",
    "encode_frame",
    "read_frame_async",
    "read_frame_sync",
]

# Bumped on incompatible changes; the child refuses an init frame of another version.
PROTOCOL_VERSION = 1
# Cap of the init frame, which the child reads before it knows max_frame_bytes; engine
# options are small, so this is generous.
MAX_INIT_BYTES = 64 * 2**20
# Bounds the blob-length table, so a garbage n_blobs cannot make us read megabytes of it.
MAX_BLOBS = 4096

_PREFIX = struct.Struct(">II")
_BLOB_LEN = struct.Struct(">Q")

T = TypeVar("T")


class _Frame(BaseModel):
    # Both ends run the same code, so an unknown field is a bug worth failing on.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Frame):
    """Resource limits the child applies to itself before importing the engine."""

    memory_bytes: int | None
    cpu_seconds: int | None
    open_files: int
    file_size_bytes: int | None
    # RLIMIT_NPROC: processes and threads of the sandbox's user namespace
    processes: int | None = None


class InitFrame(_Frame):
    type: Literal["init"] = "init"
    version: int = PROTOCOL_VERSION
    engine: str
    options: dict[str, Any]
    limits: Limits
    max_frame_bytes: int
    # the parent's logging level: the child logs to its stderr (the parent's) at this level
    log_level: int | None = None


class RequestFrame(_Frame):
    type: Literal["request"] = "request"
    id: int
    kind: str
    payload: dict[str, Any]


class ShutdownFrame(_Frame):
    type: Literal["shutdown"] = "shutdown"


class ReadyFrame(_Frame):
    type: Literal["ready"] = "ready"
    pid: int


class ProgressFrame(_Frame):
    type: Literal["progress"] = "progress"
    id: int
    data: dict[str, Any]


class ResultFrame(_Frame):
    type: Literal["result"] = "result"
    id: int
    data: dict[str, Any]


class ErrorFrame(_Frame):
    type: Literal["error"] = "error"
    id: int | None  # None when answering init
    error_type: str
    message: str


ParentFrame = Annotated[InitFrame | RequestFrame | ShutdownFrame, Field(discriminator="type")]
ChildFrame = Annotated[
    ReadyFrame | ProgressFrame | ResultFrame | ErrorFrame, Field(discriminator="type")
]
PARENT_FRAMES: TypeAdapter[ParentFrame] = TypeAdapter(ParentFrame)
CHILD_FRAMES: TypeAdapter[ChildFrame] = TypeAdapter(ChildFrame)


def encode_frame(frame: _Frame, blobs: Sequence[bytes] = (), *, max_bytes: int) -> bytes:
    """The frame's wire bytes; raises before anything is sent if it cannot be framed.

    Raises TypeError/ValueError if the header is not strict JSON (e.g. a set, NaN) and
    FrameTooLarge above `max_bytes`.
    """
    # json.dumps rather than model_dump_json: pydantic would quietly coerce values that
    # are not JSON (bytes, datetimes) in the free-form dicts; here they fail loudly.
    header = json.dumps(
        frame.model_dump(mode="python"),
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode()
    if len(blobs) > MAX_BLOBS:
        raise ChannelError(f"{len(blobs)} blobs in one frame; at most {MAX_BLOBS} are allowed")
    size = _PREFIX.size + _BLOB_LEN.size * len(blobs) + len(header) + sum(map(len, blobs))
    if size > max_bytes:
        raise FrameTooLarge(size, max_bytes)
    parts = [_PREFIX.pack(len(header), len(blobs))]
    parts.extend(_BLOB_LEN.pack(len(blob)) for blob in blobs)
    parts.append(header)
    parts.extend(blobs)
    return b"".join(parts)


def _check_prefix(prefix: bytes, max_bytes: int) -> tuple[int, int]:
    header_len, n_blobs = _PREFIX.unpack(prefix)
    if header_len == 0:
        raise ChannelError("frame has an empty header; the stream is corrupted")
    if n_blobs > MAX_BLOBS:
        raise ChannelError(f"frame announces {n_blobs} blobs (max {MAX_BLOBS}); corrupted?")
    size = _PREFIX.size + _BLOB_LEN.size * n_blobs + header_len
    if size > max_bytes:
        raise FrameTooLarge(size, max_bytes)
    return header_len, n_blobs


def _check_lengths(table: bytes, header_len: int, max_bytes: int) -> list[int]:
    lengths = [length for (length,) in _BLOB_LEN.iter_unpack(table)]
    size = _PREFIX.size + len(table) + header_len + sum(lengths)
    if size > max_bytes:
        raise FrameTooLarge(size, max_bytes)
    return lengths


def _split(
    body: bytes, header_len: int, lengths: list[int], adapter: TypeAdapter[T]
) -> tuple[T, list[bytes]]:
    try:
        frame = adapter.validate_json(body[:header_len])
    except ValidationError as exc:
        raise ChannelError(f"malformed frame header: {exc}") from None
    view = memoryview(body)
    blobs: list[bytes] = []
    offset = header_len
    for length in lengths:
        blobs.append(bytes(view[offset : offset + length]))
        offset += length
    return frame, blobs


async def read_frame_async(
    reader: asyncio.StreamReader, adapter: TypeAdapter[T], max_bytes: int
) -> tuple[T, list[bytes]]:
    """Read one frame; ChannelClosed on EOF (between or inside frames), ChannelError if bad."""
    try:
        header_len, n_blobs = _check_prefix(await reader.readexactly(_PREFIX.size), max_bytes)
        lengths = _check_lengths(
            await reader.readexactly(_BLOB_LEN.size * n_blobs), header_len, max_bytes
        )
        body = await reader.readexactly(header_len + sum(lengths))
    except asyncio.IncompleteReadError as exc:
        raise ChannelClosed(_eof_message(len(exc.partial))) from None
    return _split(body, header_len, lengths, adapter)


def read_frame_sync(
    stream: BinaryIO, adapter: TypeAdapter[T], max_bytes: int
) -> tuple[T, list[bytes]]:
    """Blocking twin of `read_frame_async`, for the child."""
    header_len, n_blobs = _check_prefix(_read_exactly(stream, _PREFIX.size), max_bytes)
    lengths = _check_lengths(_read_exactly(stream, _BLOB_LEN.size * n_blobs), header_len, max_bytes)
    body = _read_exactly(stream, header_len + sum(lengths))
    return _split(body, header_len, lengths, adapter)


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    chunks: list[bytes] = []
    remaining = n
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            raise ChannelClosed(_eof_message(n - remaining))
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _eof_message(partial: int) -> str:
    if partial:
        return f"pipe closed in the middle of a frame (after {partial} bytes of a read)"
    return "pipe closed"
