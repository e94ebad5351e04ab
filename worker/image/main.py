"""`idlegrid worker image ...`: flags and start-up of the image worker.

Only this module reads the image worker's flags and environment. Heavy imports happen
inside the command, so `idlegrid --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import ConfigDict, Field, field_validator

from protocol.control import ANNOTATOR_TYPES, ANNOTATORS, CONTROL_TYPES, AnnotatorName, ControlType
from protocol.loras import BASELINES, CIVITAI_URL
from protocol.settings import Flag, SettingsError, add_flags, validated
from worker.common.cli import (
    LOG_LEVEL,
    ApiKey,
    CoordinatorUrl,
    IdentityFile,
    LogLevel,
    WorkerName,
    claim_identity_from_flags,
    configure_logging,
)
from worker.common.config_file import add_config_flag
from worker.common.controls_cli import DonorFlags, status_outputs
from worker.common.sandboxing import Unsandboxed, confinement_allowed

if TYPE_CHECKING:
    from protocol.loras import Baseline
    from protocol.signing import Identity
    from worker.image.adapters import AdapterSettings
    from worker.image.config import ImageWorkerConfig

__all__ = ["ImageSettings", "add_image_command", "annotators", "controlnets"]

log = logging.getLogger(__name__)


class ImageSettings(DonorFlags):
    """Every setting of `idlegrid worker image` (protocol.settings)."""

    # (model_* names are the flags', not pydantic's)
    model_config = ConfigDict(protected_namespaces=())

    coordinator: CoordinatorUrl
    model: Annotated[
        str, Flag("diffusers folder, .safetensors file or Hugging Face id", required=True)
    ]
    model_config_dir: Annotated[
        Path | None, Flag("local diffusers config folder for a single .safetensors file")
    ] = Field(None, alias="model_config")
    model_name: Annotated[
        str | None, Flag("name announced to the coordinator (default: from --model)")
    ] = None
    name: WorkerName = None
    identity: IdentityFile = None
    api_key: ApiKey = None
    post_processors: Annotated[
        Path | None,
        Flag(
            "folder of post-processor weights named after AI Horde's names "
            "(GFPGAN.safetensors, RealESRGAN_x4plus.pth, ...); the worker offers those",
            metavar="DIR",
        ),
    ] = None
    max_pixels: Annotated[
        int, Field(ge=1), Flag("largest width x height accepted (default %(default)s)")
    ] = 1024 * 1024
    max_steps: Annotated[int, Field(ge=1), Flag("most steps accepted (default %(default)s)")] = 150
    threads: Annotated[
        int | None,
        Field(ge=1),
        Flag("torch CPU threads in the engine (default: torch's choice)"),
    ] = None
    job_timeout: Annotated[
        float,
        Field(gt=0),
        Flag("seconds before a stuck job is killed (default %(default)s)"),
    ] = 900.0
    max_ram: Annotated[
        float | None,
        Field(gt=0),
        Flag("memory the engine may use, in GiB (default: no cap)", metavar="GIB"),
    ] = None
    max_vram: Annotated[
        float | None,
        Field(gt=0),
        Flag("GPU memory the engine may use, in GiB (default: all of it)", metavar="GIB"),
    ] = None
    low_vram: Annotated[
        bool,
        Flag(
            "save memory at some speed: attention slicing, VAE slicing and tiling; on CUDA "
            "also float16 weights and model CPU offload"
        ),
    ] = False
    max_batch_pixels: Annotated[
        int,
        Field(ge=0),
        Flag(
            "render a job's images as one batch while width x height x images stays within "
            "this, else in chunks; 0 = one at a time (default %(default)s)"
        ),
    ] = 1024 * 1024
    controlnet: Annotated[
        list[str],
        Flag(
            "a ControlNet control model for jobs of control type TYPE (canny, hed, depth, "
            "...): a diffusers ControlNetModel folder or a .safetensors file; repeat the flag "
            "for more types",
            metavar="TYPE=PATH",
        ),
    ] = []
    annotator: Annotated[
        list[str],
        Flag(
            "weights of a ControlNet annotator: hed=PATH (lllyasviel's ControlNetHED, "
            ".safetensors or a weights-only .pth) makes hed and fakescribbles maps; repeat "
            "the flag for more annotators",
            metavar="NAME=PATH",
        ),
    ] = []
    unsandboxed: Unsandboxed = False
    preview_every: Annotated[
        int,
        Field(ge=0, le=150),
        Flag(
            "a live preview every N sampling steps, sent only while a requester watches "
            "the job with previews on; 0 = never (default %(default)s)",
            metavar="N",
        ),
    ] = 5
    preview_decoder: Annotated[
        Path | None,
        Flag(
            "TAESD for the live previews: a diffusers AutoencoderTiny folder (safetensors) "
            "matching the checkpoint (taesd for SD 1.x/2.x, taesdxl for SDXL); default: the "
            "cheaper linear approximation",
            metavar="DIR",
        ),
    ] = None
    refiner: Annotated[
        str | None,
        Flag(
            "an SDXL refiner (diffusers folder, .safetensors file or Hugging Face id, e.g. "
            "stabilityai/stable-diffusion-xl-refiner-1.0) that finishes plain txt2img jobs "
            "of an SDXL --model",
            metavar="PATH",
        ),
    ] = None
    refiner_config: Annotated[
        Path | None,
        Flag("local diffusers config folder for a single-file --refiner", metavar="DIR"),
    ] = None
    refiner_switch: Annotated[
        float,
        Field(gt=0.0, lt=1.0),
        Flag(
            "the fraction of the noise schedule the base model samples before the refiner "
            "takes over (default %(default)s)",
            metavar="F",
        ),
    ] = 0.8
    allow_loras: Annotated[
        str,
        Flag(
            "take jobs with CivitAI LoRAs and textual inversions (default %(default)s)",
            choices=("yes", "no"),
            group="LoRAs and textual inversions",
        ),
    ] = "yes"
    baseline: Annotated[
        str | None,
        Flag(
            "the checkpoint's family, which LoRAs must be made for (default: found in the "
            "model; a different one is an error)",
            choices=BASELINES,
            group="LoRAs and textual inversions",
        ),
    ] = None
    civitai_url: Annotated[
        str, Flag("CivitAI's origin (default %(default)s)", group="LoRAs and textual inversions")
    ] = CIVITAI_URL
    civitai_token: Annotated[
        str | None,
        Flag(
            "CivitAI API token, for gated files",
            secret=True,
            group="LoRAs and textual inversions",
        ),
    ] = None
    lora_cache: Annotated[
        Path | None,
        Flag(
            "folder of downloaded files (default ~/.cache/idlegrid/loras)",
            group="LoRAs and textual inversions",
        ),
    ] = None
    lora_max_mb: Annotated[
        float,
        Field(gt=0),
        Flag(
            "largest file fetched, in MB (default %(default)s)",
            group="LoRAs and textual inversions",
        ),
    ] = 400.0
    lora_cache_gb: Annotated[
        float,
        Field(gt=0),
        Flag(
            "cache size, least recently used files evicted (default %(default)s)",
            metavar="GB",
            group="LoRAs and textual inversions",
        ),
    ] = 10.0
    log_level: LogLevel = LOG_LEVEL

    @field_validator("controlnet")
    @classmethod
    def _control_models(cls, value: list[str]) -> list[str]:
        controlnets(value)
        return value

    @field_validator("annotator")
    @classmethod
    def _annotators(cls, value: list[str]) -> list[str]:
        annotators(value)
        return value


def controlnets(specs: list[str]) -> dict[ControlType, Path]:
    """`--controlnet TYPE=PATH` values as {type: absolute path}; ValueError naming the fix."""
    models: dict[ControlType, Path] = {}
    for spec in specs:
        name, sep, location = spec.partition("=")
        if not sep or not location:
            raise ValueError(f"{spec!r}: write TYPE=PATH, e.g. canny=/models/control-canny")
        control_type = next((t for t in CONTROL_TYPES if t == name.strip()), None)
        if control_type is None:
            raise ValueError(
                f"{spec!r}: unknown control type; use one of {', '.join(CONTROL_TYPES)}"
            )
        if control_type in models:
            raise ValueError(f"{spec!r}: {control_type} is given twice; give one model per type")
        path = Path(location).expanduser().absolute()
        if not path.exists():
            raise ValueError(f"{spec!r}: {path} does not exist")
        models[control_type] = path
    return models


def annotators(specs: list[str]) -> dict[AnnotatorName, Path]:
    """`--annotator NAME=PATH` values as {name: absolute path}; ValueError naming the fix."""
    weights: dict[AnnotatorName, Path] = {}
    for spec in specs:
        name, sep, location = spec.partition("=")
        if not sep or not location:
            raise ValueError(f"{spec!r}: write NAME=PATH, e.g. hed=/models/ControlNetHED.pth")
        annotator = next((a for a in ANNOTATORS if a == name.strip()), None)
        if annotator is None:
            known = ", ".join(
                f"{a} (for {', '.join(sorted(ANNOTATOR_TYPES[a]))})" for a in ANNOTATORS
            )
            raise ValueError(f"{spec!r}: unknown annotator; use one of {known}")
        if annotator in weights:
            raise ValueError(f"{spec!r}: {annotator} is given twice; give one file")
        path = Path(location).expanduser().absolute()
        if not path.is_file():
            raise ValueError(f"{spec!r}: {path} is not a file")
        if path.suffix not in (".safetensors", ".pth"):
            raise ValueError(
                f"{spec!r}: give a .safetensors or .pth file (a .pth is read with "
                "torch.load(weights_only=True); other pickles are never loaded)"
            )
        weights[annotator] = path
    return weights


def add_image_command(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    image = kinds.add_parser(
        "image",
        help="serve image generation (Stable Diffusion)",
        description="Serve Stable Diffusion image jobs from a coordinator.",
    )
    add_flags(image, ImageSettings, words={"kind": "image"})
    add_config_flag(image, kinds)
    image.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        settings = validated(ImageSettings, args)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    from worker.errors import ModelError
    from worker.image.config import ImageWorkerConfig
    from worker.image.model_source import download_hub_model, resolve_model
    from worker.image.post_files import post_processor_files

    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    try:
        source = resolve_model(settings.model, settings.model_config_dir)
    except ModelError as exc:
        print(f"error: --model: {exc}", file=sys.stderr)
        return 2
    post_processors: dict[str, Path] = {}
    if settings.post_processors is not None:
        try:
            post_processors = post_processor_files(settings.post_processors)
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    decoder = settings.preview_decoder
    if decoder is not None and not (decoder / "diffusion_pytorch_model.safetensors").is_file():
        print(
            f"error: --preview-decoder: {decoder} holds no diffusion_pytorch_model.safetensors; "
            "give a diffusers AutoencoderTiny folder (e.g. madebyollin/taesd) in safetensors",
            file=sys.stderr,
        )
        return 2
    if not confinement_allowed(settings.unsandboxed):
        return 2
    try:
        # outside the sandbox: the engine has no network and gets the folder read-only
        source = download_hub_model(source, hf_home / "idlegrid")
    except ModelError as exc:
        print(f"error: --model: {exc}", file=sys.stderr)
        return 2
    refiner = None
    if settings.refiner is not None:
        try:
            refiner = resolve_model(settings.refiner, settings.refiner_config)
            refiner = download_hub_model(refiner, hf_home / "idlegrid")
        except ModelError as exc:
            print(f"error: --refiner: {exc}", file=sys.stderr)
            return 2
    claimed = claim_identity_from_flags(settings.name, settings.identity, "image")
    if claimed is None:
        return 2
    config = ImageWorkerConfig(
        coordinator=settings.coordinator,
        model=source.location,
        model_config=source.config_dir,
        model_name=settings.model_name or source.name,
        name=claimed.name,
        identity_file=claimed.file,
        api_key=settings.api_key,
        post_processors_dir=settings.post_processors,
        post_processors=tuple(post_processors),
        max_pixels=settings.max_pixels,
        max_steps=settings.max_steps,
        threads=settings.threads,
        job_timeout=settings.job_timeout,
        donor=settings.donor_settings(),
        unsandboxed=settings.unsandboxed,
        max_ram_bytes=None if settings.max_ram is None else int(settings.max_ram * 2**30),
        max_vram_bytes=None if settings.max_vram is None else int(settings.max_vram * 2**30),
        low_vram=settings.low_vram,
        max_batch_pixels=settings.max_batch_pixels,
        controlnets=controlnets(settings.controlnet),
        annotators=annotators(settings.annotator),
        adapters=_adapter_settings(settings),
        baseline=typing.cast("Baseline | None", settings.baseline),
        checkpoint_hash_cache=Path.home() / ".cache" / "idlegrid" / "checkpoint-hashes.json",
        preview_every=settings.preview_every,
        preview_decoder=settings.preview_decoder.resolve() if settings.preview_decoder else None,
        refiner=None if refiner is None else Path(refiner.location),
        refiner_config=None if refiner is None else refiner.config_dir,
        refiner_switch=settings.refiner_switch,
    )
    with claimed:
        return asyncio.run(_serve(config, claimed.identity))


def _adapter_settings(settings: ImageSettings) -> AdapterSettings | None:
    from worker.image.adapters import AdapterSettings

    if settings.allow_loras == "no":
        return None
    cache = settings.lora_cache or Path.home() / ".cache" / "idlegrid" / "loras"
    return AdapterSettings(
        civitai_url=settings.civitai_url,
        civitai_token=settings.civitai_token,
        cache_dir=cache.resolve(),
        max_bytes=int(settings.lora_max_mb * 2**20),
        cache_bytes=int(settings.lora_cache_gb * 2**30),
    )


async def _serve(config: ImageWorkerConfig, identity: Identity) -> int:
    from sandbox.errors import EngineStartFailed
    from worker.common.link import CoordinatorLink
    from worker.common.service import run_until_signalled
    from worker.errors import CoordinatorRejected, ModelError
    from worker.image.worker import ImageWorker

    link = CoordinatorLink(config.coordinator, identity, config.name, config.api_key)
    try:
        log.info("loading model %s in the sandboxed engine", config.model_name)
        try:
            worker = await ImageWorker.create(config, link)
        except EngineStartFailed as exc:
            print(f"error: the engine could not load the model: {exc}", file=sys.stderr)
            return 1
        except ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            with status_outputs(worker.status, config.identity_file):
                if await run_until_signalled(worker.run(), worker.drain):
                    log.info("stopping after %d jobs", worker.jobs_done)
        except CoordinatorRejected as exc:
            # e.g. a model of the coordinator's image model reference with another checkpoint
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            await worker.aclose()
    finally:
        await link.aclose()
    return 0
