"""A1111's prompt syntax, against the examples A1111 documents for its parser."""

from __future__ import annotations

import pytest

from worker.image.prompt_syntax import PromptSyntaxError, attention, schedule


def _schedule(prompt: str, steps: int = 10) -> list[tuple[int, str]]:
    return [(s.end, s.text) for s in schedule(prompt, steps)]


def _weights(text: str) -> list[tuple[str, float]]:
    return [(f.text, round(f.weight, 6)) for f in attention(text)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("a [b::4] c", [(4, "a b c"), (10, "a  c")]),
        ("a [b:c:0.25] d", [(2, "a b d"), (10, "a c d")]),
        ("a [b:c:25] d", [(10, "a b d")]),
    ],
)
def test_prompt_editing_follows_a1111(prompt: str, expected: list[tuple[int, str]]) -> None:
    assert _schedule(prompt) == expected


def test_from_to_when_with_spaces_reads_the_same_words() -> None:
    # A1111 documents "a  b  d" / "a  c  d"; CLIP's tokenizer folds the spaces
    got = _schedule("a [b : c : 1] d")
    assert [(end, " ".join(text.split())) for end, text in got] == [(1, "a b d"), (10, "a c d")]


def test_alternation_switches_every_step() -> None:
    assert _schedule("[fe|]male", 4) == [(1, "female"), (2, "male"), (3, "female"), (4, "male")]
    assert _schedule("[a|(b:1.1)]", 2) == [(1, "a"), (2, "(b:1.1)")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.573),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641),
                (".", 1.1),
            ],
        ),
        ("((word))", [("word", 1.21)]),
        ("[word]", [("word", round(1 / 1.1, 6))]),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_attention_follows_a1111(text: str, expected: list[tuple[str, float]]) -> None:
    assert _weights(text) == expected


def test_break_is_marked() -> None:
    assert [f.is_break for f in attention("a BREAK b")] == [False, True, False]
    # only the word in capitals
    assert [f.is_break for f in attention("a break b")] == [False]


def test_a_weight_that_is_not_a_number_is_named() -> None:
    with pytest.raises(PromptSyntaxError, match="1.2.3"):
        attention("(word:1.2.3)")
