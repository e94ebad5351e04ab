"""The OpenAI-compatible subset: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Requests accept what OpenAI clients send for plain text generation, penalties,
structured output (`response_format`), function tools (openai_tools.py) and `logprobs`
(chat), and refuse, by name, what we do not do, instead of silently ignoring it. `n`
choices are `n` text jobs, choice i seeded with `seed + i`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from protocol.openai_tools import (
    MAX_TOOL_CALLS,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolChoice,
    call_schema,
    job_tools,
    render_call,
    render_result,
)
from protocol.params import MAX_SEED
from protocol.text import (
    KOBOLD_SAMPLING_FIELDS,
    MAX_MESSAGES,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    ContextLength,
    DynatempExponent,
    DynatempRange,
    MinP,
    Penalty,
    RepPenRange,
    RepPenSlope,
    ResponseFormat,
    SamplerOrder,
    SmoothingFactor,
    TailFree,
    TextParams,
    TokenLogprob,
    TopA,
    Typical,
)
from protocol.validation import parse

__all__ = [
    "ChatCompletion",
    "ChatCompletionRequest",
    "Completion",
    "CompletionRequest",
    "ModelList",
    "OpenAIModel",
    "StreamOptions",
    "Usage",
]

DEFAULT_MAX_TOKENS = 256
# choices one request may ask for (each is a text job)
MAX_CHOICES = 8
# the legacy completions' `logprobs` (alternatives per token), as OpenAI limits it
MAX_LEGACY_LOGPROBS = 5

# the KoboldAI samplers _Sampling takes under TextParams' own names
_KOBOLD_EXTRAS = ("max_context_length", *KOBOLD_SAMPLING_FIELDS)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


class TextPart(_Request):
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class OpenAIMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(
        default=None,
        validate_default=True,
        description="text, or a list of text parts (none only with an assistant's tool_calls)",
    )
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCall] | None = Field(
        default=None, max_length=MAX_TOOL_CALLS, description="an assistant's earlier calls"
    )
    tool_call_id: str | None = Field(
        default=None, max_length=128, description="role tool: the call it answers"
    )

    @field_validator("content")
    @classmethod
    def _content(
        cls, value: str | list[TextPart] | None, info: ValidationInfo
    ) -> str | list[TextPart] | None:
        if value is None and info.data.get("role") != "assistant":
            raise ValueError("give the message's text (only an assistant's may be left out)")
        return value

    @model_validator(mode="after")
    def _tool_fields(self) -> OpenAIMessage:
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id goes with role 'tool', and only with it")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls go only in an assistant's message")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant's message needs content or tool_calls")
        return self

    def as_chat(self) -> ChatMessage:
        content = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content or [])
        )
        if self.tool_calls:
            content = "\n".join([content, *map(render_call, self.tool_calls)]).strip()
        if self.role == "tool":
            return ChatMessage(role="user", content=render_result(self.tool_call_id, content))
        if self.role == "developer":
            return ChatMessage(role="system", content=content)
        return ChatMessage(role=self.role, content=content)


class StreamOptions(_Request):
    include_usage: bool = Field(
        default=False, description="a last chunk, before [DONE], with `usage` and no choices"
    )


class _Sampling(_Request):
    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(
        default=1, ge=1, le=MAX_CHOICES, description="choices: one text job each, seed + i"
    )
    stream: bool = False
    stream_options: StreamOptions | None = Field(default=None, description="with stream: true")
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = Field(default=None, max_length=256)
    # extensions (vLLM and others accept the same names)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    repetition_penalty: float | None = Field(default=None, ge=0.5, le=2.0)
    # KoboldAI's samplers (KoboldCpp's OpenAI route takes the same names; README)
    max_context_length: ContextLength | None = None
    rep_pen_range: RepPenRange | None = None
    rep_pen_slope: RepPenSlope | None = None
    top_a: TopA | None = None
    tfs: TailFree | None = None
    typical: Typical | None = None
    min_p: MinP | None = None
    smoothing_factor: SmoothingFactor | None = None
    dynatemp_range: DynatempRange | None = None
    dynatemp_exponent: DynatempExponent | None = None
    sampler_order: SamplerOrder | None = None
    use_default_badwordsids: bool | None = None

    @field_validator("stream_options")
    @classmethod
    def _with_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("needs stream: true; leave stream_options out or set stream")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        for stop in stops:
            if not 1 <= len(stop) <= 64:
                raise ValueError("each stop sequence must be 1-64 characters")
        return value

    def _text_params(self, **inputs: Any) -> TextParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        values: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens or DEFAULT_MAX_TOKENS,
            "stop": stops,
            "seed": self.seed,
            **inputs,
        }
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(self, name)
            if value is not None:
                values[name] = float(value) if name != "top_k" else value
        for name in _KOBOLD_EXTRAS:
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        # checks across fields (max_context_length must exceed max_tokens) name the field
        return parse(TextParams, values)


class ChatCompletionRequest(_Sampling):
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    response_format: ResponseFormat | None = Field(
        default=None, description="json_object or json_schema: constrained JSON output"
    )
    tools: list[Tool] | None = Field(
        default=None, min_length=1, max_length=MAX_TOOLS, description="README: Tools"
    )
    tool_choice: ToolChoice | None = Field(
        default=None, description="auto (the default with tools), none, required or a name"
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="accepted; an answer makes at most one call"
    )
    logprobs: bool | None = Field(default=None, description="each token's log-probability")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: the k likeliest"
    )

    @model_validator(mode="after")
    def _logprobs_fit(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true; set logprobs or leave it out")
        if self.logprobs and self.stream:
            raise ValueError("stream with logprobs is not supported; leave stream or logprobs out")
        return self

    @model_validator(mode="after")
    def _tools_fit(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice is not None and not self.tools:
            raise ValueError("tool_choice needs tools; leave tool_choice out or give tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
            t.function.name for t in self.tools or []
        }:
            raise ValueError(f"tool_choice names {choice.function.name!r}, not one of the tools")
        constrained = self.response_format is not None and self.response_format.type != "text"
        if self.tools and self.effective_tool_choice != "none" and constrained:
            raise ValueError(
                "response_format with tools: leave one out (or set tool_choice to 'none')"
            )
        return self

    @property
    def effective_tool_choice(self) -> ToolChoice:
        return self.tool_choice or ("auto" if self.tools else "none")

    def text_params(self) -> TextParams:
        messages = [m.as_chat() for m in self.messages]
        inputs: dict[str, Any] = {"messages": messages}
        if self.max_completion_tokens is not None:
            inputs["max_tokens"] = self.max_completion_tokens
        if self.response_format is not None and self.response_format.type != "text":
            inputs["response_format"] = self.response_format
        if self.logprobs:
            inputs["logprobs"] = True
            inputs["top_logprobs"] = self.top_logprobs or 0
        choice = self.effective_tool_choice
        if self.tools and choice != "none":
            # the gateway gives them to the model (its template's tools section, or the
            # system prompt: README Tools)
            inputs.update(job_tools(self.tools, choice))
            schema = call_schema(self.tools, choice)
            if schema is not None:
                inputs["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "tool_call", "schema": schema},
                }
        return self._text_params(**inputs)


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LEGACY_LOGPROBS,
        description="each token's log-probability and this many likeliest alternatives",
    )

    @field_validator("logprobs")
    @classmethod
    def _not_streamed(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("stream"):
            raise ValueError("is not supported with stream; leave stream or logprobs out")
        return value

    def text_params(self) -> TextParams:
        if self.logprobs is None:
            return self._text_params(prompt=self.prompt)
        return self._text_params(prompt=self.prompt, logprobs=True, top_logprobs=self.logprobs)


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None

    # (no return annotation: the serialization schema stays the model's own)
    @model_serializer(mode="wrap")
    def _no_calls_left_out(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        data: dict[str, Any] = handler(self)
        if self.tool_calls is None:
            del data["tool_calls"]
        return data


class OpenAITopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] = Field(description="the token's text as UTF-8")


class OpenAITokenLogprob(OpenAITopLogprob):
    top_logprobs: list[OpenAITopLogprob]


class ChoiceLogprobs(_Response):
    content: list[OpenAITokenLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, entries: list[TokenLogprob]) -> ChoiceLogprobs:
        """OpenAI's shape of a job's logprobs (the bytes of each token added)."""

        def top(token: str, logprob: float) -> OpenAITopLogprob:
            return OpenAITopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

        return cls(
            content=[
                OpenAITokenLogprob(
                    **top(e.token, e.logprob).model_dump(),
                    top_logprobs=[top(t.token, t.logprob) for t in e.top_logprobs],
                )
                for e in entries
            ]
        )


class ChatChoice(_Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class LegacyLogprobs(_Response):
    """The legacy completions' logprobs: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def of(cls, entries: list[TokenLogprob]) -> LegacyLogprobs:
        offsets, at = [], 0
        for entry in entries:
            offsets.append(at)
            at += len(entry.token)
        return cls(
            tokens=[e.token for e in entries],
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries],
            text_offset=offsets,
        )


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: LegacyLogprobs | None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class OpenAIModel(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "idlegrid"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]
