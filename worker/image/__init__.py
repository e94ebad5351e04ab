"""The image worker: Stable Diffusion jobs run by a diffusers engine inside the sandbox.

    main.py           `idlegrid worker image ...`: flags -> ImageWorkerConfig
    config.py         ImageWorkerConfig, the service's one configuration object
    worker.py         ImageWorker: pop -> sandboxed engine -> signed result; survives crashes
    engine.py         ImageEngine, hosted in the sandbox child process (torch, diffusers)
    sources.py        a job's source image and mask: decoded within caps, AI Horde's mask
                      conventions, resized for the img2img and inpaint pipelines
    samplers.py       AUTOMATIC1111 sampler names -> diffusers schedulers
    model_source.py   resolves --model safely (safetensors only, never pickle)
    adapters.py       a job's CivitAI LoRAs and TIs made ready before the engine runs:
                      baseline and pin checks, trigger words, what was used
    civitai.py        CivitAI's REST API v1: names and ids -> versions and files
    lora_cache.py     downloads (size cap, SHA-256, safetensors header) in an LRU folder
                      the sandbox binds read-only
    adapters_engine.py  loading LoRAs and TIs into the pipeline (in the sandbox child)

Only the sandbox child imports `engine.py`, `adapters_engine.py` and `sources.py` (by name,
`worker.image.worker.ENGINE`).
"""

__all__: list[str] = []
