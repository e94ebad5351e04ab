"""The text gateway: pops text jobs and generates them through the swarm.

    main.py           `idlegrid worker gateway ...`: flags -> GatewayConfig
    config.py         GatewayConfig, the service's one configuration object
    gateway.py        TextGateway: pop -> generate through the swarm -> stream text,
                      spot-check the servers (redo without a wrong one), report usage
    multiplex.py      EngineJobs: several jobs at once in the one engine (start, poll, cancel)
    running.py        RunningJobs: the engine's side of it, jobs as tasks on its event loop
    kept.py           KeptSessions: finished chats' sessions kept for their requester's next turn
    lm_head.py        embeddings, final norm and LM head, loaded without the blocks
    generation.py     the generation loop and sampling (greedy, temperature, top-k/p, ...)
    speculative.py    speculative decoding: drafts by prompt lookup, the acceptance rule
    grammar.py        response_format: llguidance's grammar masks the logits each step
    chat_format.py    chat messages -> prompt (the tokenizer's template, or a default)

The decoder blocks run on block servers, reached through `worker.llm.swarm.routing` and
`worker.llm.swarm.session`.
"""

__all__: list[str] = []
