"""The donor's daemon: serves jobs from a coordinator and earns kudos.

    main.py       `idlegrid worker image|blocks|gateway` and `idlegrid models` (registration)
    errors.py     WorkerError and its subclasses: the worker's one error tree
    common/       what every service shares: coordinator link, identity, service loop, flags
    image/        the image worker: diffusers engine in the sandbox, samplers, model source
    llm/          the LLM swarm (block server, client, DHT records, placement), the text
                  gateway (LM head, generation, chat format) and the block server's command
    models/       `idlegrid models` builders and converters; never imported by the runtime

Imports point down: main -> image | llm | models -> common -> errors (import-linter checks
it). Heavy imports (torch, diffusers) happen only in the engine process and the commands.
"""

__all__: list[str] = []
