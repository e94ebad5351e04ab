"""The image worker: Stable Diffusion jobs run by a diffusers engine inside the sandbox.

    main.py           `idlegrid worker image ...`: flags -> ImageWorkerConfig
    config.py         ImageWorkerConfig, the service's one configuration object
    worker.py         ImageWorker: pop -> sandboxed engine -> signed result; survives crashes
    engine.py         ImageEngine, hosted in the sandbox child process (torch, diffusers)
    sources.py        a job's source image and mask: decoded within caps, AI Horde's mask
                      conventions, resized for the img2img and inpaint pipelines
    control.py        ControlNet: the donor's control models, a job's control map (canny,
                      or a ready map), diffusers' ControlNet pipeline on the loaded modules
    samplers.py       AUTOMATIC1111 sampler names -> diffusers schedulers
    model_source.py   resolves --model safely (safetensors only, never pickle)

Only the sandbox child imports `engine.py`, `sources.py` and `control.py` (by name,
`worker.image.worker.ENGINE`).
"""

__all__: list[str] = []
