"""Text (LLM) jobs: parameters, API messages and the gateway's usage report.

A text job is a chat (`messages`) or a raw completion (`prompt`). The coordinator never
tokenizes: it reserves kudos for an upper bound of the tokens (`token_bound`) and the
gateway's signed report of what each block server processed settles the real cost. A job's
text is at most `text_cap(max_tokens)` characters, streamed or final.

A model's sizes (`TextModel`) price its work, so they come from the coordinator's
catalog; a gateway offers what it runs and is refused unless that matches the catalog.
`BUILTIN_TEXT_MODELS` are the models `idlegrid models` builds.

Besides the plain samplers, `TextParams` has KoboldAI's (what SillyTavern and KoboldAI
Lite send through AI Horde's v2 API): each is off by default. `sampler_order` lists
`SAMPLER_IDS`; `max_context_length` cuts the prompt to its last tokens on the gateway.
OpenAI's extras are off by default too: `presence_penalty`, `frequency_penalty` and
`response_format` (JSON output constrained by a grammar on the gateway: `ResponseFormat`,
its JSON schema compiled by llguidance here already, so a bad one is refused at submit).
A field at its default is left out when serialized (stored, hashed, leased): a job that
uses none of these is exactly what it was before they existed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from protocol.params import MAX_SEED

if TYPE_CHECKING:  # (the type exists only in llguidance's stub)
    from llguidance._lib import JsonCompileOptions

__all__ = [
    "BUILTIN_DEFAULT_MODEL",
    "BUILTIN_TEXT_MODELS",
    "MAX_CHARS_PER_TOKEN",
    "MAX_NEW_TOKENS",
    "MAX_TOP_LOGPROBS",
    "KOBOLD_FIELDS",
    "OPENAI_FIELDS",
    "KOBOLD_SAMPLER_ORDER",
    "KOBOLD_SAMPLING_FIELDS",
    "SAMPLER_IDS",
    "ChatMessage",
    "JsonSchemaFormat",
    "LeasedTextJob",
    "PeerLink",
    "PeerLinked",
    "ResponseFormat",
    "ServedSpan",
    "ServerCheck",
    "TextDelta",
    "TextDeltaAccepted",
    "TextFailure",
    "TextJobCreated",
    "TextModel",
    "TextParams",
    "TextPopRequest",
    "TextPopResponse",
    "TextResultAccepted",
    "TextResultSubmit",
    "TokenLogprob",
    "TopLogprob",
    "TextStatus",
    "sampler_order_problem",
    "compilable_schema",
    "schema_problem",
    "text_cap",
    "token_bound",
]

MAX_NEW_TOKENS = 4096
MAX_PROMPT_CHARS = 200_000
MAX_MESSAGES = 256
MAX_CONTEXT_TOKENS = 1_048_576
MAX_STOPS = 16
MAX_STOP_CHARS = 128

# KoboldAI's sampler ids, as `sampler_order` lists them
SAMPLER_IDS = {
    0: "top_k",
    1: "top_a",
    2: "top_p",
    3: "tfs",
    4: "typical",
    5: "temperature",
    6: "rep_pen",
}
# KoboldAI Lite's and KoboldCpp's default order (what AI Horde's text workers use)
KOBOLD_SAMPLER_ORDER = (6, 0, 1, 3, 4, 2, 5)
# KoboldAI's sampling fields that TextParams has under the same names (AI Horde's v2 text API
# sends them in `params`; the OpenAI route takes them as extra fields)
KOBOLD_SAMPLING_FIELDS = (
    "rep_pen_range",
    "rep_pen_slope",
    "top_a",
    "tfs",
    "typical",
    "min_p",
    "smoothing_factor",
    "dynatemp_range",
    "dynatemp_exponent",
    "sampler_order",
    "use_default_badwordsids",
)
# template tokens a chat format may add around one message (role markers, separators)
TEMPLATE_TOKENS_PER_MESSAGE = 32
TEMPLATE_TOKENS_FIXED = 32
# with tools: what a chat template (or protocol.openai_tools.tools_prompt) writes around
# their definitions, at most
TEMPLATE_TOKENS_TOOLS = 1024
# tools in one request
MAX_TOOLS = 64
# Characters one generated token may add to a job's text. A token decodes to at most one
# character per byte of it (UTF-8, or U+FFFD per stray byte), so the bound is the longest
# token of a vocabulary: 81 characters in SmolLM2's (a run of spaces), 9 in the tiny
# model's; 128 leaves room for vocabularies with longer whitespace runs.
MAX_CHARS_PER_TOKEN = 128

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


class ChatMessage(_Request):
    role: Role
    content: str = Field(max_length=MAX_PROMPT_CHARS)


# KoboldAI's sampler fields (TextParams; the OpenAI route takes them as extras)
ContextLength = Annotated[
    int,
    Field(
        ge=2,
        le=MAX_CONTEXT_TOKENS,
        description="tokens: the prompt keeps its last max_context_length - max_tokens "
        "tokens (none: a prompt longer than the model's context is refused)",
    ),
]
RepPenRange = Annotated[
    int, Field(ge=0, le=MAX_CONTEXT_TOKENS, description="penalise only the last tokens; 0 = all")
]
RepPenSlope = Annotated[
    float, Field(ge=0.0, le=10.0, description="with rep_pen_range: 0 = the same penalty")
]
TopA = Annotated[float, Field(ge=0.0, le=1.0, description="0 = off")]
TailFree = Annotated[float, Field(ge=0.0, le=1.0, description="tail-free sampling; 1 = off")]
Typical = Annotated[float, Field(ge=0.0, le=1.0, description="1 = off")]
MinP = Annotated[float, Field(ge=0.0, le=1.0, description="0 = off")]
SmoothingFactor = Annotated[
    float, Field(ge=0.0, le=10.0, description="quadratic sampling; 0 = off")
]
DynatempRange = Annotated[
    float, Field(ge=0.0, le=5.0, description="dynamic temperature +-range; 0 = off")
]
DynatempExponent = Annotated[float, Field(ge=0.0, le=5.0, description="1 = linear")]
# OpenAI's penalties: logit -= presence * (count > 0) + frequency * count, over the
# tokens generated so far
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, description="0 = off")]

MAX_SCHEMA_NAME = 64
# alternatives reported per token with logprobs (OpenAI's limit)
MAX_TOP_LOGPROBS = 20


def compilable_schema(schema: dict[str, Any]) -> dict[str, Any]:
    problem = schema_problem(schema)
    if problem:
        raise ValueError(f"cannot be compiled to a grammar: {problem}")
    return schema


class JsonSchemaFormat(_Request):
    """OpenAI's `response_format.json_schema`: the output is JSON valid against `schema`."""

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, serialize_by_alias=True, validate_by_name=True
    )

    name: str = Field(min_length=1, max_length=MAX_SCHEMA_NAME, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(default=None, max_length=4096)
    schema_: Annotated[dict[str, Any], AfterValidator(compilable_schema)] = Field(
        alias="schema", description="a JSON Schema; the output always follows it"
    )
    strict: bool | None = Field(
        default=None, description="accepted; the schema is always enforced (README)"
    )


class ResponseFormat(_Request):
    """What the output must be: any text, a JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("give json_schema exactly when type is 'json_schema'")
        return self

    def grammar(self) -> str | None:
        """The llguidance grammar the output must match (None: any text)."""
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema is not None else {"type": "object"}
        return _json_grammar(schema)


def _json_grammar(schema: dict[str, Any]) -> str:
    from llguidance import LLMatcher

    # compact JSON (no whitespace between tokens): sampled runs of it could fill max_tokens;
    # oneOf as anyOf (pydantic's discriminated unions: their branches exclude each other)
    options: JsonCompileOptions = {"whitespace_flexible": False, "coerce_one_of": True}
    return LLMatcher.grammar_from_json_schema(schema, defaults=options)


def schema_problem(schema: dict[str, Any]) -> str | None:
    """Why llguidance cannot compile `schema` (None: it can). Needs no tokenizer."""
    from llguidance import LLMatcher

    try:
        grammar = _json_grammar(schema)
    except ValueError as exc:
        return str(exc)
    return LLMatcher.validate_grammar(grammar) or None


def _valid_order(order: list[int]) -> list[int]:
    problem = sampler_order_problem(order)
    if problem:
        raise ValueError(problem)
    return order


SamplerOrder = Annotated[
    list[int],
    Field(
        min_length=6,
        max_length=7,
        description="KoboldAI's sampler ids (0 top_k, 1 top_a, 2 top_p, 3 tfs, 4 typical, "
        "5 temperature, 6 rep_pen), each once; none: rep_pen, temperature, top_k, top_p...",
    ),
    AfterValidator(_valid_order),
]


class TextParams(_Request):
    """What to generate. Exactly one of `messages` (chat) and `prompt` (completion)."""

    model: str | None = Field(default=None, min_length=1, max_length=128)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS)
    max_tokens: int = Field(default=128, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.7, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000, description="0 = off")
    repetition_penalty: float = Field(default=1.0, ge=0.5, le=3.0, description="1 = off")
    stop: list[str] = Field(default=[], max_length=MAX_STOPS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    # KoboldAI's samplers and options (README: KoboldAI samplers); the defaults are off
    max_context_length: ContextLength | None = None
    rep_pen_range: RepPenRange = 0
    rep_pen_slope: RepPenSlope = 0.0
    top_a: TopA = 0.0
    tfs: TailFree = 1.0
    typical: Typical = 1.0
    min_p: MinP = 0.0
    smoothing_factor: SmoothingFactor = 0.0
    dynatemp_range: DynatempRange = 0.0
    dynatemp_exponent: DynatempExponent = 1.0
    sampler_order: SamplerOrder | None = None
    use_default_badwordsids: bool = Field(default=False, description="ban end-of-sequence")
    singleline: bool = Field(default=False, description="end at the first newline")
    frmttriminc: bool = Field(default=False, description="trim an incomplete last sentence")
    frmtrmblln: bool = Field(default=False, description="collapse blank lines")
    frmtrmspch: bool = Field(default=False, description="remove #/@%}{+=~|\\^<>")
    frmtadsnsp: bool = Field(
        default=False, description="a space before the output if the prompt ends in none"
    )
    # OpenAI's extras (README: Structured output)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    response_format: ResponseFormat | None = Field(
        default=None, description="JSON output, constrained by a grammar; none: any text"
    )
    logprobs: bool = Field(default=False, description="report each token's log-probability")
    top_logprobs: int = Field(
        default=0, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: the k likeliest too"
    )
    # OpenAI's function tools (README: Tools), for the gateway to give the model: through
    # its chat template when that has a tools section, else in the system prompt
    tools: list[dict[str, Any]] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TOOLS,
        description="OpenAI's tool definitions ({type: function, function: {name, ...}})",
    )
    tool_choice: str | dict[str, Any] = Field(
        default="auto", description="with tools: auto, required, or {type: function, ...}"
    )

    # (no return annotation: the serialization schema stays TextParams' own)
    @model_serializer(mode="wrap")
    def _unused_kobold_fields_left_out(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        # KoboldAI's and OpenAI's extra fields at their "off" defaults are left out, so a
        # job that uses none is stored, hashed (params_hash) and leased exactly as before
        # they existed
        data: dict[str, Any] = handler(self)
        for name, default in _OPTIONAL_DEFAULTS.items():
            if name in data and getattr(self, name) == default:
                del data[name]
        return data

    @model_validator(mode="after")
    def _tools_are_openais(self) -> TextParams:
        if self.tools is None:
            if self.tool_choice != "auto":
                raise ValueError("tool_choice needs tools; leave tool_choice out or give tools")
            return self
        if self.messages is None:
            raise ValueError("tools need messages (chat); leave tools out of a prompt")
        # (protocol.openai_tools imports this module)
        from protocol.openai_tools import tools_of

        tools_of(self)  # ValueError naming the field
        return self

    @model_validator(mode="after")
    def _one_input(self) -> TextParams:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' (chat) and 'prompt' (completion)")
        for i, stop in enumerate(self.stop):
            if not 1 <= len(stop) <= MAX_STOP_CHARS:
                raise ValueError(f"stop[{i}] must be 1-{MAX_STOP_CHARS} characters")
        return self

    @field_validator("max_context_length")
    @classmethod
    def _room_for_the_prompt(cls, value: int | None, info: ValidationInfo) -> int | None:
        max_tokens = info.data.get("max_tokens")
        if value is not None and isinstance(max_tokens, int) and value <= max_tokens:
            raise ValueError(
                f"must exceed the tokens to generate ({max_tokens}): it holds the prompt and "
                f"the answer (got {value})"
            )
        return value


_FIELDS = tuple(TextParams.model_fields)
# TextParams' KoboldAI fields, then OpenAI's extras
KOBOLD_FIELDS = _FIELDS[_FIELDS.index("max_context_length") : _FIELDS.index("presence_penalty")]
OPENAI_FIELDS = _FIELDS[_FIELDS.index("presence_penalty") :]
# both, with their "off" defaults
_OPTIONAL_DEFAULTS = {
    name: TextParams.model_fields[name].default for name in KOBOLD_FIELDS + OPENAI_FIELDS
}


def sampler_order_problem(order: Sequence[int]) -> str | None:
    """What is wrong with a `sampler_order` (None when it is fine): it must list each of
    KoboldAI's ids 0-6 once, or 0-5 once (then the repetition penalty comes first)."""
    if sorted(order) not in (list(range(6)), list(range(7))):
        ids = ", ".join(f"{i} {name}" for i, name in SAMPLER_IDS.items())
        return f"must list each of the ids 0-6 once ({ids}), or 0-5 once; got {list(order)}"
    return None


def token_bound(params: TextParams) -> int:
    """An upper bound of the tokens a job can process: prompt bytes + template + new tokens.

    Byte-level tokenizers never make more tokens than the text has UTF-8 bytes.
    """
    if params.messages is not None:
        prompt = sum(len(m.content.encode()) + TEMPLATE_TOKENS_PER_MESSAGE for m in params.messages)
    else:
        prompt = len((params.prompt or "").encode())
    if params.tools:
        # templates write the definitions as JSON, some indented: twice its plain bytes
        # bound that, plus what they write around them
        prompt += 2 * len(json.dumps(params.tools, ensure_ascii=False).encode())
        prompt += TEMPLATE_TOKENS_TOOLS
    if params.max_context_length is not None:
        # the gateway keeps only the prompt's last max_context_length - max_tokens tokens
        return (
            min(prompt + TEMPLATE_TOKENS_FIXED, params.max_context_length - params.max_tokens)
            + params.max_tokens
        )
    return prompt + TEMPLATE_TOKENS_FIXED + params.max_tokens


def text_cap(max_tokens: int) -> int:
    """Most characters the text of a job with `max_tokens` may hold (streamed or final)."""
    return max_tokens * MAX_CHARS_PER_TOKEN


class TextModel(_Request):
    """A model and its sizes: an entry of the coordinator's catalog, or a gateway's offer."""

    name: str = Field(min_length=1, max_length=128)
    blocks: int = Field(ge=1, le=1024, description="decoder blocks (num_hidden_layers)")
    parameters: int = Field(ge=1, description="total parameter count")
    max_context: int = Field(ge=16, le=MAX_CONTEXT_TOKENS, description="tokens, prompt included")

    def sizes(self) -> str:
        return f"blocks {self.blocks}, parameters {self.parameters}, context {self.max_context}"


# What `idlegrid models tiny DIR` writes to DIR/llm and `idlegrid models smollm2 DIR` to
# DIR/smollm2, offered under their folders' names (tests/worker/llm/gateway compare them).
BUILTIN_TEXT_MODELS = (
    TextModel(name="llm", blocks=4, parameters=276_032, max_context=512),
    TextModel(name="smollm2", blocks=30, parameters=134_515_008, max_context=8192),
)
BUILTIN_DEFAULT_MODEL = "llm"


class TextJobCreated(_Response):
    id: str
    kudos_cost: int = Field(description="kudos reserved now; unused kudos are refunded")
    queue_position: int | None


class TextStatus(_Response):
    id: str
    kind: Literal["text"] = "text"
    state: Literal["queued", "leased", "done", "failed", "cancelled"]
    queue_position: int | None
    eta_seconds: float | None = Field(
        default=None, description="estimated seconds until done, from recent throughput"
    )
    model: str | None
    text: str = Field(default="", description="generated so far; complete once done")
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    kudos_cost: int = Field(description="reserved while running; the charge once done")
    attempts: int = 0
    error: str | None = None
    disputable: bool = Field(
        default=False,
        description="an AI Horde text worker's text whose pay is held: POST .../dispute",
    )

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class TextPopRequest(_Request):
    models: list[TextModel] = Field(
        min_length=1,
        max_length=8,
        description="what this gateway runs; each must match the coordinator's catalog "
        "(GET /v1/models) exactly, or the pop is refused with 400",
    )
    wait: float = Field(default=10.0, ge=0.0, le=60.0, description="long-poll seconds")


class LeasedTextJob(_Response):
    id: str
    model: str
    params: TextParams
    params_hash: str
    lease_seconds: float
    lease_deadline: float
    # who asked, as an opaque tag the same for one account's jobs on this worker and
    # different on every other worker (no account id): a gateway reuses one requester's
    # kept attention caches only for that requester's next turn. None for anonymous jobs.
    requester: str | None = Field(default=None, max_length=128)


class TextPopResponse(_Response):
    job: LeasedTextJob | None


def _no_nul(text: str) -> str:
    # PostgreSQL text cannot hold NUL, and no tokenizer decodes to it
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    return text


ModelText = Annotated[str, AfterValidator(_no_nul)]


class TextDelta(_Request):
    """Newly generated text; `offset` is the length of the text already sent (retry-safe).

    The job's whole text may reach `text_cap(max_tokens)` characters; a delta past it is
    refused (400)."""

    offset: int = Field(ge=0)
    text: ModelText = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class TextDeltaAccepted(_Response):
    id: str
    length: int
    lease_deadline: float


class ServedSpan(_Request):
    """Block server `peer_id` ran blocks [start, end) for `tokens` tokens of this job."""

    peer_id: str = Field(min_length=1, max_length=128)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    tokens: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ServedSpan:
        if self.end <= self.start:
            raise ValueError("end must be greater than start")
        return self


class ServerCheck(_Request):
    """A gateway's spot check of block server `peer_id`: it re-ran one step of blocks
    [start, end) on other servers (`checkers`: the second server and, after a disagreement,
    the third that decided) and compared the hidden states within a tolerance.

    `agree`: the second server matched. `wrong`: the others matched each other and not
    `peer_id` (when the second server was the odd one out, the gateway reports it as the
    wrong one, checked by `peer_id` and the referee). `undecided`: no third server could
    decide a disagreement."""

    peer_id: str = Field(min_length=1, max_length=128)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    checkers: list[str] = Field(min_length=1, max_length=2)
    verdict: Literal["agree", "wrong", "undecided"]

    @model_validator(mode="after")
    def _valid(self) -> ServerCheck:
        if self.end <= self.start:
            raise ValueError("end must be greater than start")
        if self.peer_id in self.checkers or len(set(self.checkers)) != len(self.checkers):
            raise ValueError("checkers must be other servers than peer_id, each once")
        return self


class TopLogprob(_Request):
    """A token and its log-probability under the model (README: Logprobs)."""

    token: str = Field(max_length=MAX_CHARS_PER_TOKEN)
    logprob: float = Field(le=0.0)


class TokenLogprob(TopLogprob):
    """A generated token, its log-probability and the likeliest tokens at its place."""

    top_logprobs: list[TopLogprob] = Field(default=[], max_length=MAX_TOP_LOGPROBS)


class TextResultSubmit(_Request):
    text: ModelText = Field(
        max_length=MAX_NEW_TOKENS * MAX_CHARS_PER_TOKEN,
        description=f"at most max_tokens x {MAX_CHARS_PER_TOKEN} characters",
    )
    finish_reason: FinishReason
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0, le=MAX_NEW_TOKENS)
    spans: list[ServedSpan] = Field(max_length=4096)
    checks: list[ServerCheck] = Field(
        default=[], max_length=64, description="the gateway's spot checks of block servers"
    )
    signature: str = Field(pattern=r"^[0-9a-f]{128}$", description="over text_result_message")
    logprobs: list[TokenLogprob] | None = Field(
        default=None,
        max_length=MAX_NEW_TOKENS,
        description="with params.logprobs: one per token of the text (not signed)",
    )


class TextResultAccepted(_Response):
    id: str
    kudos_charged: int
    kudos_refunded: int
    kudos_earned: int = Field(description="what this gateway's owner earned")


class TextFailure(_Request):
    reason: str = Field(min_length=1, max_length=500)
    retry: bool = Field(
        default=True,
        description="false when retrying cannot help (e.g. no server serves some blocks): "
        "the job fails now and the requester is refunded",
    )


class PeerLink(_Request):
    """A block server links its hivemind peer id to the worker identity it registered,
    proving that it holds the peer id's libp2p key: `peer_signature` is that key's
    signature over protocol.signing.peer_proof_message(nonce, worker id, peer id)."""

    peer_id: str = Field(min_length=1, max_length=128, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")
    nonce: str | None = Field(
        default=None, max_length=64, description="from POST /api/v1/workers/challenge"
    )
    peer_signature: str | None = Field(
        default=None, max_length=1024, pattern=r"^[0-9a-f]+$", description="libp2p key's, hex"
    )
    peer_public_key: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^[0-9a-f]+$",
        description="libp2p-encoded public key, hex; only for peer ids that hash it (RSA)",
    )
    # workers before peer-id proofs sent these and no proof: they are told to upgrade
    timestamp: int | None = Field(default=None, description="unused (sent by old workers)")
    signature: str | None = Field(default=None, description="unused (sent by old workers)")


class PeerLinked(_Response):
    peer_id: str
    worker_id: str
