"""Messages between a worker and the engine it hosts in a sandboxed child process.

An `EngineCall` names one kind of call and the models of what crosses the pipe: the
request the worker sends, the progress messages the engine emits while it runs (if any),
and its result. Both ends validate against them (`sandbox.calls`): the child before the
engine sees a request, the worker before it believes a progress message or a result, so a
malformed message from a hostile engine is an error naming the field, never a KeyError deep
in the worker.

    IMAGE           ImageParams (+ binary input: none for txt2img, else the source
                    image, then the mask if there is one) -> ImageResult (+ one PNG per
                    image), emitting ImageProgress after each sampling step (with a
                    preview every `preview_every` steps); the engine is built from
                    ImageEngineOptions
    IMAGE_INFO      NoMessage -> ImageEngineInfo: the checkpoint the image engine loaded
    TEXT_INFO       NoMessage -> TextModel: the model the text gateway's engine serves
    TEXT_GENERATE   GenerateText -> GeneratedText, emitting TextChunk as text is made
    TEXT_START      StartText -> NoMessage: begin a text job beside the others running
    TEXT_POLL       PollText -> TextEvents: the running jobs' text, results and failures
                    since the last poll (waits up to `wait` seconds for one)
    TEXT_CANCEL     CancelText -> NoMessage: stop a running job
    TEXT_STATS      NoMessage -> EngineStats: its spot checks so far, the peers it bans
    TEXT_CONFIGURE  CheckRate -> NoMessage: the share of jobs checked from now on
    TEXT_REFRESH    NoMessage -> SwarmPeers: re-read the swarm's records (tests)
    BLOCK_STEP      HiddenStep + hidden bytes -> HiddenShape + output bytes: a session's
                    next tokens through a block server's span (its compute process,
                    built from BlockEngineOptions)
    BLOCK_STEPS     HiddenSteps + one hidden blob per step -> StepOutputs + one output blob
                    per step: several sessions' steps as batched forwards
    BLOCK_FORWARD   HiddenPass + hidden bytes -> HiddenShape + output bytes (no cache)
    BLOCK_CLOSE     BlockRequest -> NoMessage: drop the caches of the sessions it names
    BLOCK_MEASURE   BlockRequest -> Throughput: the span's tokens per second

Only pydantic: the child imports this before the engine, the worker without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field

from protocol.control import AnnotatorName, ControlType
from protocol.loras import Baseline
from protocol.params import MAX_N, MAX_SEED, MAX_SIDE, MAX_STEPS, MIN_SIDE, ImageParams
from protocol.preview import PREVIEW_BASE64_CHARS
from protocol.text import (
    FinishReason,
    ServedSpan,
    ServerCheck,
    TextModel,
    TextParams,
    TokenLogprob,
)

__all__ = [
    "BLOCK_CLOSE",
    "BLOCK_FORWARD",
    "BLOCK_MEASURE",
    "BLOCK_STEP",
    "BLOCK_STEPS",
    "IMAGE",
    "IMAGE_INFO",
    "TEXT_CANCEL",
    "TEXT_CONFIGURE",
    "TEXT_GENERATE",
    "TEXT_INFO",
    "TEXT_POLL",
    "TEXT_REFRESH",
    "TEXT_START",
    "TEXT_STATS",
    "BlockEngineOptions",
    "BlockQuant",
    "BlockRequest",
    "CancelText",
    "CheckRate",
    "EngineCall",
    "EngineMessage",
    "EngineStats",
    "GenerateText",
    "GeneratedText",
    "HiddenPass",
    "HiddenShape",
    "HiddenStep",
    "ImageEngineInfo",
    "HiddenSteps",
    "ImageEngineOptions",
    "ImageProgress",
    "ImageResult",
    "NoMessage",
    "QUANTS",
    "PollText",
    "SessionStep",
    "StartText",
    "StepOutput",
    "StepOutputs",
    "SwarmPeers",
    "TextChunk",
    "TextEvent",
    "TextEvents",
    "Throughput",
]


class EngineMessage(BaseModel):
    """Base of the messages: both ends run the same code, so an unknown field is a bug."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoMessage(EngineMessage):
    """An empty request or result; as a call's progress type, that it emits none."""


RequestT = TypeVar("RequestT", bound=BaseModel)
ProgressT = TypeVar("ProgressT", bound=BaseModel)
ResultT = TypeVar("ResultT", bound=BaseModel)


@dataclass(frozen=True)
class EngineCall(Generic[RequestT, ProgressT, ResultT]):
    """One kind of call: its name on the wire and the model of each message."""

    kind: str
    request: type[RequestT]
    result: type[ResultT]
    # None: the engine emits no progress during this call; one would be a protocol error
    progress: type[ProgressT] | None = None


class ImageEngineOptions(EngineMessage):
    """How the image engine is built (the options of `Sandbox.create`, dumped by alias)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    # a folder, a .safetensors file or a hub id (see worker.image.model_source)
    model: str = Field(min_length=1)
    # the diffusers config folder of a single-file model
    model_config_dir: str | None = Field(default=None, alias="model_config")
    # the name written into PNGs and results; None = the folder name, file stem or hub id
    model_name: str | None = Field(default=None, min_length=1)
    # torch intra-op threads; None keeps torch's default
    threads: int | None = None
    # the GPU memory the engine may use; None = all of it
    max_vram_bytes: int | None = None
    # --low-vram: attention slicing, VAE slicing and tiling; on CUDA also model CPU offload
    # (accelerate) and float16 weights (worker.image.low_vram)
    low_vram: bool = False
    # the images of a job run as one UNet batch while width x height x images stays within
    # this many pixels, else in chunks (worker.image.batch); 0 = one image at a time
    max_batch_pixels: int = Field(default=1024 * 1024, ge=0)
    # the donor's post-processor weights (worker.image.postprocess); None = none
    post_processors: str | None = None
    # ControlNet: the control model of each type (worker.image.control)
    controlnets: dict[ControlType, str] = {}
    # the donor's annotator weights, by annotator (worker.image.hed)
    annotators: dict[AnnotatorName, str] = {}
    # a live preview every this many sampling steps (worker.image.preview); 0 = none
    preview_every: int = Field(default=0, ge=0, le=MAX_STEPS)
    # the donor's TAESD for them (an AutoencoderTiny folder); None = the linear factors
    preview_decoder: str | None = None
    # an SDXL refiner for txt2img jobs (worker.image.refiner): a folder or a .safetensors
    # file with its config folder, and the fraction of the schedule the base runs
    refiner: str | None = None
    refiner_config: str | None = None
    refiner_switch: float = Field(default=0.8, gt=0.0, lt=1.0)


class ImageProgress(EngineMessage):
    """Image `image` of `n` has finished sampling step `step` of `steps` (the steps
    sampled: with a source image, `protocol.params.sampled_steps`)."""

    image: int = Field(ge=0, lt=MAX_N)
    # (a hires fix samples up to twice `steps`: both passes)
    step: int = Field(ge=0, le=MAX_STEPS * 2)
    steps: int = Field(ge=1, le=MAX_STEPS * 2)
    n: int = Field(ge=1, le=MAX_N)
    # every `preview_every` steps: the image so far, base64 of a small JPEG (protocol.preview)
    preview: str | None = Field(default=None, max_length=PREVIEW_BASE64_CHARS)


class ImageResult(EngineMessage):
    """What the engine made; the PNGs travel beside it as blobs, one per seed."""

    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED + MAX_N)]] = Field(
        min_length=1, max_length=MAX_N
    )
    model: str = Field(min_length=1)
    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE)
    # the engine's peak memory during the job, in bytes: CUDA's peak allocation, or on the
    # CPU the process's peak resident set (worker.image.memory); None = not measurable
    peak_memory_bytes: int | None = Field(default=None, ge=0)


IMAGE: EngineCall[ImageParams, ImageProgress, ImageResult] = EngineCall(
    "image", ImageParams, ImageResult, ImageProgress
)


class ImageEngineInfo(EngineMessage):
    """The checkpoint the image engine loaded."""

    model: str = Field(min_length=1)
    # a 9-channel inpainting UNet: it serves only inpainting and outpainting jobs
    inpainting: bool
    # the model's family, as LoRAs are made for it (worker.image.baselines)
    baseline: Baseline = "sd1"
    # the weights' dtype (float16 only with --low-vram on CUDA), as spot checks compare it
    dtype: str = "float32"
    # the engine's peak memory so far, in bytes (see ImageResult.peak_memory_bytes): after
    # the start, what loading the model took
    peak_memory_bytes: int | None = Field(default=None, ge=0)
    # the SDXL refiner's name (worker.image.refiner) and its switch point; None = none
    refiner: str | None = None
    refiner_switch: float | None = None


IMAGE_INFO: EngineCall[NoMessage, NoMessage, ImageEngineInfo] = EngineCall(
    "image_info", NoMessage, ImageEngineInfo
)


class GenerateText(EngineMessage):
    """One text job for the gateway's engine."""

    params: TextParams
    # the coordinator's opaque tag of who asked (LeasedTextJob.requester): reuse key
    requester: str | None = Field(default=None, max_length=128)


class TextChunk(EngineMessage):
    """Text generated since the last chunk."""

    text: str


class GeneratedText(EngineMessage):
    """A finished text job: the text, usage, who served it and the spot checks made."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    # from the start to the first generated token (prefill included), and in all
    first_token_seconds: float = Field(ge=0.0)
    seconds: float = Field(ge=0.0)
    spans: list[ServedSpan]
    checks: list[ServerCheck]
    # with params.logprobs (README: Logprobs)
    logprobs: list[TokenLogprob] | None = None


class EngineStats(EngineMessage):
    """What the gateway engine's spot checks found and cost since it started
    (`worker.llm.gateway.core.CheckStats`), and the checked peers it bans now."""

    # block-tokens the servers computed for jobs, and the checkers computed
    served_block_tokens: int = Field(ge=0)
    checked_block_tokens: int = Field(ge=0)
    jobs: int = Field(ge=0)
    checked_jobs: int = Field(ge=0)
    # jobs in which a check found some server wrong
    caught_jobs: int = Field(ge=0)
    # every check made, oldest first
    checks: list[ServerCheck]
    banned: list[str]


class CheckRate(EngineMessage):
    """The share of jobs spot-checked from now on."""

    check_rate: float = Field(ge=0.0, le=1.0)


class StartText(EngineMessage):
    """A text job to run beside the others (the gateway's job id names it in events)."""

    job: str = Field(min_length=1, max_length=128)
    params: TextParams
    # the coordinator's opaque tag of who asked (LeasedTextJob.requester): reuse key
    requester: str | None = Field(default=None, max_length=128)


class PollText(EngineMessage):
    wait: float = Field(ge=0.0, le=60.0)


class CancelText(EngineMessage):
    job: str


class TextEvent(EngineMessage):
    """What happened to one running job: more `text`, its `result`, or its failure
    (`error_type` and `error`, as an `EngineFailed` of TEXT_GENERATE would say)."""

    job: str
    text: str = ""
    result: GeneratedText | None = None
    error_type: str | None = None
    error: str | None = None


class TextEvents(EngineMessage):
    events: list[TextEvent]


class SwarmPeers(EngineMessage):
    """The peer ids of the swarm's valid records."""

    records: list[str]


TEXT_INFO: EngineCall[NoMessage, NoMessage, TextModel] = EngineCall("info", NoMessage, TextModel)
TEXT_GENERATE: EngineCall[GenerateText, TextChunk, GeneratedText] = EngineCall(
    "generate", GenerateText, GeneratedText, TextChunk
)
TEXT_START: EngineCall[StartText, NoMessage, NoMessage] = EngineCall("start", StartText, NoMessage)
TEXT_POLL: EngineCall[PollText, NoMessage, TextEvents] = EngineCall("poll", PollText, TextEvents)
TEXT_CANCEL: EngineCall[CancelText, NoMessage, NoMessage] = EngineCall(
    "cancel", CancelText, NoMessage
)
TEXT_STATS: EngineCall[NoMessage, NoMessage, EngineStats] = EngineCall(
    "stats", NoMessage, EngineStats
)
TEXT_CONFIGURE: EngineCall[CheckRate, NoMessage, NoMessage] = EngineCall(
    "configure", CheckRate, NoMessage
)
TEXT_REFRESH: EngineCall[NoMessage, NoMessage, SwarmPeers] = EngineCall(
    "refresh", NoMessage, SwarmPeers
)


# a block server's weight quantization (`--quant`; worker.llm.swarm.quant): int8 is torchao's
# weight-only int8 (CPU or CUDA), bnb-int8 and nf4 are bitsandbytes' LLM.int8 and 4-bit
# NormalFloat (CUDA only)
BlockQuant = Literal["none", "int8", "bnb-int8", "nf4"]
QUANTS: tuple[str, ...] = get_args(BlockQuant)


class BlockEngineOptions(EngineMessage):
    """How a block server's compute process is built."""

    model_dir: str = Field(min_length=1)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    # a torch dtype name for the layers, or None to keep the stored one
    dtype: str | None = None
    threads: int = Field(ge=1)
    # weight quantization (worker.llm.swarm.quant)
    quant: BlockQuant = "none"


class BlockRequest(EngineMessage):
    """Every request to the compute process may name sessions whose caches to drop first."""

    close: list[str] = []


class HiddenPass(BlockRequest):
    """Hidden states (the blob: row-major bytes of `dtype`, `shape`) through blocks
    [start, end). The server checked the bytes against the shape; the compute checks again."""

    dtype: str
    shape: list[int]
    start: int
    end: int


class HiddenStep(HiddenPass):
    """A session's next tokens, after the first `past` tokens of its cache (a cache holding
    more is cut to `past` first: a rollback)."""

    session: str
    past: int = Field(default=0, ge=0)


class HiddenShape(EngineMessage):
    """The shape of the float32 row-major output beside it (the blob)."""

    shape: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=8)


class SessionStep(EngineMessage):
    """One session's step in a `HiddenSteps` batch (its blob at the same index); `past` as
    in `HiddenStep` (the cache is cut to it first)."""

    session: str
    past: int = Field(ge=0)
    dtype: str
    shape: list[int]
    start: int
    end: int


class HiddenSteps(BlockRequest):
    """Several sessions' next tokens at once; steps of the same blocks and token count run
    as one batched forward."""

    steps: list[SessionStep] = Field(min_length=1)


class StepOutput(EngineMessage):
    """A step's output shape (its float32 blob beside it), or why it failed (empty blob)."""

    shape: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, max_length=8)
    # the ValueError of a step whose bytes or shape could not be read
    error: str | None = None


class StepOutputs(EngineMessage):
    outputs: list[StepOutput]


class Throughput(EngineMessage):
    tokens_per_second: float = Field(ge=0.0)


BLOCK_STEP: EngineCall[HiddenStep, NoMessage, HiddenShape] = EngineCall(
    "step", HiddenStep, HiddenShape
)
BLOCK_STEPS: EngineCall[HiddenSteps, NoMessage, StepOutputs] = EngineCall(
    "steps", HiddenSteps, StepOutputs
)
BLOCK_FORWARD: EngineCall[HiddenPass, NoMessage, HiddenShape] = EngineCall(
    "forward", HiddenPass, HiddenShape
)
BLOCK_CLOSE: EngineCall[BlockRequest, NoMessage, NoMessage] = EngineCall(
    "close", BlockRequest, NoMessage
)
BLOCK_MEASURE: EngineCall[BlockRequest, NoMessage, Throughput] = EngineCall(
    "measure", BlockRequest, Throughput
)
