"""LLM chat: decoder blocks served by a swarm of block servers, driven by text gateways.

    blocks_main.py    `idlegrid worker blocks ...`: the block server's flags and start-up
    architecture.py   supported model families, config loading, causal masks, windows
    checkpoint.py     SafetensorsCheckpoint: per-tensor reads of a model folder
    swarm/            block server, swarm client (routing, sessions), DHT records, wire
                      format, placement
    gateway/          the text gateway: LM head, generation loop, chat format

The gateway imports the swarm's client; the swarm never imports the gateway.
"""

__all__: list[str] = []
