"""render_chat: the tokenizer's template when it has one, the plain format otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from worker.errors import InvalidGenerationInput
from worker.llm.gateway.chat_format import render_chat

MESSAGES = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Größe?"},
]


@pytest.fixture
def tokenizer(tiny_models: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_models / "llm", local_files_only=True)


def test_uses_the_tokenizers_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    assert render_chat(tokenizer, MESSAGES) == (
        "<s><|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\nHello.</s>\n"
        "<|user|>\nGröße?\n<|assistant|>\n"
    )


def test_without_a_template_uses_role_lines(tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer.chat_template = None
    assert render_chat(tokenizer, MESSAGES) == (
        "system: Be terse.\nuser: Hi\nassistant: Hello.\nuser: Größe?\nassistant:"
    )


@pytest.mark.parametrize(
    ("messages", "field", "says"),
    [
        ([], "messages", "empty"),
        ("hello", "messages", "list"),
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "messages[1].role",
         "'bot'; use one of system, user, assistant"),
        ([{"content": "a"}], "messages[0].role", "None"),
        ([{"role": "user", "content": 5}], "messages[0].content", "int"),
        ([{"role": "user"}], "messages[0].content", "NoneType"),
        ([{"role": "user", "content": "a", "tool": "x"}], "messages[0].tool",
         "not a message field"),
        (["hi"], "messages[0]", "str"),
    ],
)  # fmt: skip
def test_bad_messages_name_index_and_field(
    tokenizer: PreTrainedTokenizerBase, messages: Any, field: str, says: str
) -> None:
    with pytest.raises(InvalidGenerationInput) as caught:
        render_chat(tokenizer, messages)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert says in str(caught.value)
