"""The image worker's one configuration object. Only `worker.image.main` builds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from protocol.control import AnnotatorName, ControlType
from protocol.loras import Baseline
from protocol.params import MAX_STEPS
from worker.common.donor import DonorSettings
from worker.image.adapters import AdapterSettings

__all__ = ["ImageWorkerConfig"]


@dataclass(frozen=True)
class ImageWorkerConfig:
    # coordinator base URL, e.g. http://127.0.0.1:8470
    coordinator: str
    # --model as given: a diffusers folder, a .safetensors file or a Hugging Face id
    model: str
    # local diffusers config folder for a single-file checkpoint
    model_config: Path | None
    # the model name announced to the coordinator (default: derived from the model)
    model_name: str
    # the worker's display name
    name: str
    # the Ed25519 identity file (created on first start)
    identity_file: Path
    # the owner's API key: earnings go to that account (else to a per-worker account)
    api_key: str | None = None
    # the donor's post-processor weights (--post-processors DIR) and the names found in it
    # (worker.image.post_files); the worker advertises exactly these
    post_processors_dir: Path | None = None
    post_processors: tuple[str, ...] = ()
    # largest job accepted, in pixels per image and in steps
    max_pixels: int = 1024 * 1024
    max_steps: int = MAX_STEPS
    # torch threads in the engine process (None = torch's default)
    threads: int | None = None
    # run the engine unconfined (--unsandboxed): it then shares the worker's user, files
    # and network; reported to the coordinator in the engine info
    unsandboxed: bool = False
    # the engine's memory (address space) cap in bytes (--max-ram; None = no cap)
    max_ram_bytes: int | None = None
    # the GPU memory the engine may use, in bytes (--max-vram; None = all of it)
    max_vram_bytes: int | None = None
    # --low-vram: attention slicing, VAE slicing and tiling; on CUDA also float16 weights and
    # model CPU offload (worker.image.low_vram)
    low_vram: bool = False
    # --max-batch-pixels: a job's images run as one UNet batch while width x height x images
    # stays within this, else in chunks; 0 = one at a time (worker.image.batch)
    max_batch_pixels: int = 1024 * 1024
    # seconds one job may run in the engine before it is killed and the job given back
    job_timeout: float = 900.0
    # seconds the engine may take to load the model
    load_timeout: float = 600.0
    # long-poll length when asking for work
    pop_wait: float = 10.0
    # at most one progress report per this many seconds (the last step is never sent)
    progress_interval: float = 0.25
    # while the engine works, report again (the last step) after this many seconds without
    # a report, so that phases without sampling steps keep the lease (None = a third of
    # the job's lease)
    heartbeat_interval: float | None = None
    # donor controls: when jobs may be taken (--when, --schedule, --max-jobs-per-hour, ...)
    donor: DonorSettings = field(default_factory=DonorSettings)
    # seconds between looks at the donor controls while they hold the worker back
    gate_poll: float = 1.0
    # --controlnet TYPE=PATH: the ControlNet model of each control type it serves
    controlnets: dict[ControlType, Path] = field(default_factory=dict)
    # --annotator NAME=PATH: the annotator weights it makes control maps with (hed)
    annotators: dict[AnnotatorName, Path] = field(default_factory=dict)
    # LoRAs and textual inversions from CivitAI (None: --allow-loras no, none taken)
    adapters: AdapterSettings | None = None
    # --baseline: the family the operator says the model is (None: the one the engine finds
    # in it; another than that one is a start-up error)
    baseline: Baseline | None = None
    # the JSON file caching checkpoint file hashes (worker.image.checkpoint_hash; None:
    # hash every start)
    checkpoint_hash_cache: Path | None = None
    # live previews (worker.image.preview): the engine makes one every this many sampling
    # steps (0 = never); one is sent at most every `preview_interval` seconds, and only
    # while the coordinator says a requester watches the job with previews on
    preview_every: int = 5
    preview_interval: float = 1.0
    # --preview-decoder DIR: TAESD (an AutoencoderTiny folder) makes them instead of the
    # linear factors (None)
    preview_decoder: Path | None = None
    # --refiner PATH: an SDXL refiner for plain txt2img jobs (worker.image.refiner), its
    # config folder when it is a single file, and --refiner-switch (the fraction of the
    # schedule the base samples)
    refiner: Path | None = None
    refiner_config: Path | None = None
    refiner_switch: float = 0.8
