"""The donor's daemon: serves jobs from a coordinator and earns kudos.

    main.py           `idlegrid worker ...` and `idlegrid models ...` (flags -> config)
    config.py         ImageWorkerConfig and GatewayConfig, one per service
    image_worker.py   pop -> sandboxed engine -> signed result; survives engine crashes
    image_engine.py   the diffusers engine hosted in the sandbox child process
    samplers.py       AUTOMATIC1111 sampler names -> diffusers schedulers
    model_source.py   resolves --model safely (safetensors only, never pickle)
    link.py           HTTP link to the coordinator (and retrying while it is away)
    service.py        running a service until SIGINT/SIGTERM
    blocks_main.py    `idlegrid worker blocks ...`: the LLM block server's flags
    gateway_main.py   `idlegrid worker gateway ...`: the text gateway's flags
    gateway.py        pop text job -> generate through the swarm -> stream text, report usage
    swarm/            the block server and swarm client over hivemind (DHT + P2P RPC)
    lm_head.py        embeddings, final norm and LM head, loaded without the blocks
    generation.py     the generation loop and sampling (greedy, temperature, top-k/p, ...)
    local_blocks.py   all decoder blocks run locally: the reference and benchmark baseline
    chat_format.py    chat messages -> prompt (the tokenizer's template, or a default)
    identity.py       the Ed25519 identity file
    tiny_models.py    deterministic tiny random SD and Llama models for tests and demos
    smollm2.py        `idlegrid models smollm2`: SmolLM2's GGUF -> a safetensors folder
    errors.py         WorkerError and its subclasses

Heavy imports (torch, diffusers) happen only in the engine process and the commands.
"""

__all__: list[str] = []
