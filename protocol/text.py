"""Text (LLM) jobs: parameters, API messages and the gateway's usage report.

A text job is a chat (`messages`) or a raw completion (`prompt`). The coordinator never
tokenizes: it reserves kudos for an upper bound of the tokens (`token_bound`) and the
gateway's signed report of what each block server processed settles the real cost.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.params import MAX_SEED

__all__ = [
    "MAX_NEW_TOKENS",
    "ChatMessage",
    "LeasedTextJob",
    "PeerLink",
    "PeerLinked",
    "ServedSpan",
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
    "TextStatus",
    "token_bound",
]

MAX_NEW_TOKENS = 4096
MAX_PROMPT_CHARS = 200_000
MAX_MESSAGES = 256
# template tokens a chat format may add around one message (role markers, separators)
TEMPLATE_TOKENS_PER_MESSAGE = 32
TEMPLATE_TOKENS_FIXED = 32

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


class ChatMessage(_Request):
    role: Role
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class TextParams(_Request):
    """What to generate. Exactly one of `messages` (chat) and `prompt` (completion)."""

    model: str | None = Field(default=None, min_length=1, max_length=128)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS)
    max_tokens: int = Field(default=128, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000, description="0 = off")
    repetition_penalty: float = Field(default=1.0, ge=0.5, le=2.0, description="1 = off")
    stop: list[str] = Field(default=[], max_length=4)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _one_input(self) -> TextParams:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' (chat) and 'prompt' (completion)")
        for i, stop in enumerate(self.stop):
            if not 1 <= len(stop) <= 64:
                raise ValueError(f"stop[{i}] must be 1-64 characters")
        return self


def token_bound(params: TextParams) -> int:
    """An upper bound of the tokens a job can process: prompt bytes + template + new tokens.

    Byte-level tokenizers never make more tokens than the text has UTF-8 bytes.
    """
    if params.messages is not None:
        prompt = sum(len(m.content.encode()) + TEMPLATE_TOKENS_PER_MESSAGE for m in params.messages)
    else:
        prompt = len((params.prompt or "").encode())
    return prompt + TEMPLATE_TOKENS_FIXED + params.max_tokens


class TextModel(_Request):
    """A model a gateway can run through the swarm."""

    name: str = Field(min_length=1, max_length=128)
    blocks: int = Field(ge=1, le=1024)
    parameters: int = Field(ge=1, description="total parameter count")
    max_context: int = Field(ge=16, le=1_048_576)


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

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


class TextPopRequest(_Request):
    models: list[TextModel] = Field(min_length=1, max_length=8)
    wait: float = Field(default=10.0, ge=0.0, le=60.0, description="long-poll seconds")


class LeasedTextJob(_Response):
    id: str
    model: str
    params: TextParams
    params_hash: str
    lease_seconds: float
    lease_deadline: float


class TextPopResponse(_Response):
    job: LeasedTextJob | None


class TextDelta(_Request):
    """Newly generated text; `offset` is the length of the text already sent (retry-safe)."""

    offset: int = Field(ge=0)
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


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


class TextResultSubmit(_Request):
    text: str = Field(max_length=MAX_NEW_TOKENS * 64)
    finish_reason: FinishReason
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0, le=MAX_NEW_TOKENS)
    spans: list[ServedSpan] = Field(max_length=4096)
    signature: str = Field(pattern=r"^[0-9a-f]{128}$", description="over text_result_message")


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
    """A block server links its hivemind peer id to the worker identity it registered."""

    peer_id: str = Field(min_length=1, max_length=128, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")
    timestamp: int = Field(description="unix seconds; must be within 5 minutes of the server")
    signature: str = Field(pattern=r"^[0-9a-f]{128}$", description="over peer_link_message")


class PeerLinked(_Response):
    peer_id: str
    worker_id: str
