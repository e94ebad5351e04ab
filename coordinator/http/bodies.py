"""What a JSON request body may be: its size per route (one table), its depth, strict JSON.

`BODY_LIMITS` sizes each route's body to what it carries (README "Request bodies"): an
image a worker submits inline, an image request with room for a source image and a mask,
a long prompt; every other route gets `DEFAULT_BODY_BYTES`. `load_json` refuses a body
nested deeper than `MAX_JSON_DEPTH` before parsing it (Python's parser recurses once per
level), numbers of more than MAX_INT_DIGITS digits, NaN or Infinity (not JSON), and lone
surrogates (not text). Numbers are range-checked by each field (a 400 naming it).
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from coordinator.errors import BadRequest
from coordinator.jobs.png_check import MAX_PNG_BYTES, byte_limit
from protocol.params import MAX_SIDE
from protocol.text import MAX_CHARS_PER_TOKEN, MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_TOP_LOGPROBS

__all__ = [
    "BODY_LIMITS",
    "DEFAULT_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "body_limit",
    "load_json",
]

# accounts, transfers, pops, progress, failures: small records
DEFAULT_BODY_BYTES = 64 * 1024
# no request of ours nests more than a few levels; 64 leaves room for clients' extras
MAX_JSON_DEPTH = 64


def _base64(size: int) -> int:
    return (size + 2) // 3 * 4


def _json_text(chars: int) -> int:
    # the longest JSON form of one character is an escaped surrogate pair: 12 bytes
    return chars * 12


# one image of the largest job, as an uncompressed PNG in base64 (what the v1 upload allows
# as raw bytes: coordinator.jobs.png_check.byte_limit)
_IMAGE = _base64(MAX_PNG_BYTES)
# a source image or mask as a requester may send it: an uncompressed RGBA PNG of the
# largest job's size (2048x2048), in base64
_SOURCE = _base64(byte_limit(MAX_SIDE, MAX_SIDE, channels=4))
# an image request: a source image and a mask of that size (AI Horde's `source_image`,
# `source_mask`) besides the prompt and parameters
_IMAGE_REQUEST = 2 * _SOURCE + DEFAULT_BODY_BYTES
# a prompt (or a conversation) of the longest length a text job takes
_TEXT_REQUEST = _json_text(MAX_PROMPT_CHARS) + DEFAULT_BODY_BYTES

BODY_LIMITS: dict[tuple[str, str], int] = {
    ("POST", "/api/v1/jobs/image"): _IMAGE_REQUEST,
    ("POST", "/api/v2/generate/async"): _IMAGE_REQUEST,
    ("POST", "/api/v2/generate/submit"): _IMAGE + DEFAULT_BODY_BYTES,
    ("POST", "/api/v1/text/jobs"): _TEXT_REQUEST,
    ("POST", "/api/v1/quotes/text"): _TEXT_REQUEST,
    ("POST", "/api/v2/generate/text/async"): _TEXT_REQUEST,
    ("POST", "/v1/chat/completions"): _TEXT_REQUEST,
    ("POST", "/v1/completions"): _TEXT_REQUEST,
    # a gateway's streamed text and its result: the longest text a job may hold, plus the
    # usage report's spans (4096 of at most ~250 bytes) and logprobs (each token and its
    # top 20: ~40 bytes and the token's JSON text, 128 bytes an entry leaves room for most)
    ("POST", "/api/v1/text/jobs/{job_id}/delta"): _json_text(MAX_PROMPT_CHARS) + DEFAULT_BODY_BYTES,
    # an AI Horde text worker's text: the longest a job may hold
    ("POST", "/api/v2/generate/text/submit"): _json_text(MAX_NEW_TOKENS * MAX_CHARS_PER_TOKEN)
    + DEFAULT_BODY_BYTES,
    ("POST", "/api/v1/text/jobs/{job_id}/result"): _json_text(MAX_NEW_TOKENS * MAX_CHARS_PER_TOKEN)
    + 4096 * 256
    + MAX_NEW_TOKENS * (MAX_TOP_LOGPROBS + 1) * 128
    + DEFAULT_BODY_BYTES,
}


def body_limit(method: str, path: str) -> int:
    """The largest body route `method path` accepts."""
    return BODY_LIMITS.get((method, path), DEFAULT_BODY_BYTES)


# a JSON string (escapes included); every byte that is not a bracket
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# brackets walked per numpy pass (bounds the memory a hostile body takes)
_CHUNK = 1 << 20


def _too_deep(raw: bytes) -> bool:
    """More than MAX_JSON_DEPTH levels of arrays and objects? Found without recursion, in
    linear time at C speed: strings removed, then the running depth of the brackets left."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return False  # (most bodies) fewer openers than levels, strings' ones included
    brackets = np.frombuffer(_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS), np.uint8)
    depth = 0
    for start in range(0, len(brackets), _CHUNK):
        part = brackets[start : start + _CHUNK]
        running = np.cumsum(np.where((part == ord("[")) | (part == ord("{")), 1, -1)) + depth
        if int(running.max()) > MAX_JSON_DEPTH:
            return True
        depth = int(running[-1])
    return False


# digits of the longest whole number any field takes (2**64 has 20); past this a number is
# refused while parsing, before Python's own cap (4300 digits) answers with advice for
# programmers
MAX_INT_DIGITS = 40


def _whole_number(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(
            f"a whole number of {len(text.lstrip('-'))} digits is out of range of every field "
            f"(at most {MAX_INT_DIGITS} digits)"
        )
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def load_json(raw: bytes) -> Any:
    """The parsed body; BadRequest naming `body` when it is not JSON, nests deeper than
    MAX_JSON_DEPTH, or holds NaN or Infinity."""
    if _too_deep(raw):
        raise BadRequest(
            f"body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
            [("body", f"must nest at most {MAX_JSON_DEPTH} levels")],
        )
    try:
        data = json.loads(raw or b"null", parse_constant=_no_constant, parse_int=_whole_number)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(
            f"body is not valid JSON: {exc}", [("body", "send a JSON object")]
        ) from None
    # (a lone surrogate can only come from a \\uD800-\\uDFFF escape: no such escape, no walk)
    if (b"\\ud" in raw or b"\\uD" in raw) and not _valid_unicode(data):
        raise BadRequest(
            "body holds a string with a lone surrogate escape (such as \\ud800), which is "
            "not a character",
            [("body", "send valid Unicode text")],
        )
    return data


def _valid_unicode(data: Any) -> bool:
    """No string in `data` holds a lone surrogate (JSON's `\\ud800` escape parses to one;
    it cannot be encoded, so it would fail later, anywhere). Recursion is bounded by the
    depth checked before parsing."""
    if isinstance(data, str):
        if data.isascii():
            return True
        try:
            data.encode()
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(data, list):
        return all(_valid_unicode(item) for item in data)
    if isinstance(data, dict):
        return all(_valid_unicode(k) and _valid_unicode(v) for k, v in data.items())
    return True
