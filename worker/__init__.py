"""The donor's daemon: serves jobs from a coordinator and earns kudos.

    main.py           `idlegrid worker ...` and `idlegrid models ...` (flags -> config)
    config.py         ImageWorkerConfig, the one configuration object
    image_worker.py   pop -> sandboxed engine -> signed result; survives engine crashes
    image_engine.py   the diffusers engine hosted in the sandbox child process
    samplers.py       AUTOMATIC1111 sampler names -> diffusers schedulers
    model_source.py   resolves --model safely (safetensors only, never pickle)
    link.py           HTTP link to the coordinator
    identity.py       the Ed25519 identity file
    tiny_models.py    deterministic tiny random SD and Llama models for tests and demos
    errors.py         WorkerError and its subclasses

Heavy imports (torch, diffusers) happen only in the engine process and the commands.
"""

__all__: list[str] = []
