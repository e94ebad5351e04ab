"""The LLM swarm: block servers and the client that routes through them (hivemind 1.1.12).

    blocks.py    BlockSpan: decoder layers [start, end) loaded from safetensors and run on
                 their own; ModelInfo from config.json and the safetensors headers
    records.py   signed DHT announcements (ServerRecord) and their strict parsing
    server.py    BlockServer: DHT + P2P handlers (rpc_inference, rpc_forward, rpc_info),
                 bounded sessions, announcements; choose_blocks for load balancing
    client.py    SwarmClient: routes, InferenceSession with replay on server failure,
                 per-server usage

Errors live in `worker.errors` under `SwarmError`. The design follows Petals (servers
announce block ranges in a DHT, clients chain servers and keep a history to replay to a
replacement); the code is our own, on hivemind's DHT and P2P only.
"""

__all__: list[str] = []
