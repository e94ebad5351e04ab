"""The image worker: Stable Diffusion jobs run by a diffusers engine inside the sandbox.

    main.py           `idlegrid worker image ...`: flags -> ImageWorkerConfig
    config.py         ImageWorkerConfig, the service's one configuration object
    worker.py         ImageWorker: pop -> sandboxed engine -> signed result; survives crashes
    engine.py         ImageEngine, hosted in the sandbox child process (torch, diffusers)
    baselines.py      the model's family (SD 1.x, SD 2, SDXL): its pipelines, its baseline,
                      its prompt encoding
    conditioning.py   prompts encoded A1111's way (weights, chunks, editing; SDXL's two
                      encoders)
    sources.py        a job's source image and mask: decoded within caps, AI Horde's mask
                      conventions, resized for the img2img and inpaint pipelines
    control.py        ControlNet: the donor's control models, a job's control map (canny,
                      or a ready map), diffusers' ControlNet pipeline on the loaded modules
    samplers.py       AUTOMATIC1111 sampler names -> diffusers schedulers
    preview.py        live previews: latents -> RGB by the published linear factors, JPEG
    hires.py          the hires fix: native-size pass, latents upscaled, img2img pass
    batch.py          a job's images as UNet batches (one generator each), their progress
    low_vram.py       the pipeline on its device; --low-vram's slicing, tiling, offload
    memory.py         the engine's peak memory during a job (CUDA, or the CPU's peak RSS)
    postprocess.py    GFPGAN and the RRDBNet upscalers on a finished image (spandrel)
    spandrel_archs.py spandrel's architectures without its registry (no torchvision)
    post_files.py     --post-processors DIR: which post-processors a donor's folder holds
    model_source.py   resolves --model safely (safetensors only, never pickle)
    checkpoint_hash.py  the checkpoint's SHA-256 the image model reference pins (cached)
    adapters.py       a job's CivitAI LoRAs and TIs made ready before the engine runs:
                      baseline and pin checks, trigger words, what was used
    civitai.py        CivitAI's REST API v1: names and ids -> versions and files
    lora_cache.py     downloads (size cap, SHA-256, safetensors header) in an LRU folder
                      the sandbox binds read-only
    adapters_engine.py  loading LoRAs and TIs into the pipeline (in the sandbox child)

Only the sandbox child imports `engine.py`, `baselines.py`, `adapters_engine.py`,
`sources.py`, `hires.py`, `postprocess.py`, `preview.py`, `control.py`, `batch.py`,
`low_vram.py` and `memory.py` (by name,
`worker.image.worker.ENGINE`).
"""

__all__: list[str] = []
