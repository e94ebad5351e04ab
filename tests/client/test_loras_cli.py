"""`idlegrid generate --lora NAME[:MODEL[:CLIP]] --ti NAME[:STRENGTH]`."""

from __future__ import annotations

import pytest

from client.cli import build_parser
from client.loras_cli import adapter_fields, split_strengths


@pytest.mark.parametrize(
    ("text", "most", "expected"),
    [
        ("Tiny Style", 2, ("Tiny Style", [])),
        ("12345:0.8", 2, ("12345", [0.8])),
        ("12345:0.8:0.5", 2, ("12345", [0.8, 0.5])),
        ("odd:name:1:2:3", 2, ("odd:name:1", [2.0, 3.0])),
        ("odd:name", 2, ("odd:name", [])),
        ("bad:-1.5", 1, ("bad", [-1.5])),
    ],
)
def test_trailing_numbers_are_strengths(
    text: str, most: int, expected: tuple[str, list[float]]
) -> None:
    assert split_strengths(text, most) == expected


def test_flags_become_the_jobs_loras_and_tis() -> None:
    args = build_parser().parse_args(
        ["generate", "x", "--lora", "a:0.5", "--lora", "7:1:0.2", "--ti", "neg:0.5", "--ti", "t"]
    )
    assert adapter_fields(args) == {
        "loras": [{"name": "a", "model": 0.5}, {"name": "7", "model": 1.0, "clip": 0.2}],
        "tis": [{"name": "neg", "strength": 0.5}, {"name": "t"}],
    }
    assert adapter_fields(build_parser().parse_args(["generate", "x"])) == {}
