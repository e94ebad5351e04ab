"""`idlegrid models ...`: builders and converters of model folders, run offline.

    main.py           `idlegrid models tiny|smollm2 DIR`: flags (registered by worker.main)
    tiny_models.py    deterministic tiny random SD 1 (plain, inpainting), SD 2, SDXL, Llama
    tiny_controlnet.py  a tiny random ControlNet for the tiny SD model (tests)
    tiny_single_file.py  SDXL and its refiner as one original-layout file (tests)
    smollm2.py        SmolLM2-135M-Instruct's GGUF -> a safetensors Llama folder

The runtime never imports this package (an import-linter contract checks it); only
`worker.main` registers its commands.
"""

__all__: list[str] = []
