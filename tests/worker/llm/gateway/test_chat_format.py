"""render_chat: the tokenizer's template when it has one, the plain format otherwise; tools
through the template's tools section, else in the system prompt."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from protocol.openai_tools import Tool, tools_prompt
from worker.errors import InvalidGenerationInput
from worker.llm.gateway.chat_format import render_chat, template_takes_tools

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


# a template with a tools section, in the manner of Hermes/Qwen templates: the definitions
# as JSON lines in the system turn, calls taught in <tool_call> tags
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\nTools:\n{% for tool in tools %}"
    "{{ tool | tojson }}\n{% endfor %}Call one as <tool_call>{...}</tool_call>\n{% endif %}"
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "The weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
)
CHAT = [{"role": "user", "content": "Weather in Oslo?"}]


def test_a_template_with_a_tools_section_gets_the_tools(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenizer.chat_template = TOOLS_TEMPLATE
    assert template_takes_tools(tokenizer)
    rendered = render_chat(tokenizer, CHAT, [WEATHER], "required")
    definition = (
        '{"type": "function", "function": {"name": "weather", "description": "The weather", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}'
    )
    assert rendered == (
        f"<s><|system|>\nTools:\n{definition}\nCall one as <tool_call>{{...}}</tool_call>\n"
        "<|user|>\nWeather in Oslo?\n<|assistant|>\n"
    )
    assert "You can call these tools" not in rendered
    # no tools: the same template, no tools section
    assert render_chat(tokenizer, CHAT) == "<s><|user|>\nWeather in Oslo?\n<|assistant|>\n"


def test_a_template_without_one_gets_them_in_the_system_prompt(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    assert not template_takes_tools(tokenizer)
    section = tools_prompt([WEATHER], "required")
    assert render_chat(tokenizer, CHAT, [WEATHER], "required") == (
        f"<s><|system|>\n{section}\n<|user|>\nWeather in Oslo?\n<|assistant|>\n"
    )
    with_system = [{"role": "system", "content": "Be terse."}, *CHAT]
    assert render_chat(tokenizer, with_system, [WEATHER], "auto").startswith(
        "<s><|system|>\nBe terse.\n\nYou can call these tools (functions); each is a JSON line:\n"
        '{"name":"weather","description":"The weather","parameters":'
    )


def test_smollm2_keeps_the_system_prompt_format() -> None:
    path = os.environ.get("IDLEGRID_TEST_SMOLLM2")
    if not path or not Path(path).is_dir():
        pytest.skip("IDLEGRID_TEST_SMOLLM2 is not set to SmolLM2's folder")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert not template_takes_tools(tokenizer)
    section = tools_prompt([WEATHER], "auto")
    assert render_chat(tokenizer, CHAT, [WEATHER], "auto") == (
        f"<|im_start|>system\n{section}<|im_end|>\n<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
