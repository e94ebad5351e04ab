"""The LLM swarm: block servers and the client that routes through them (hivemind 1.1.12).

    blocks.py     BlockSpan: decoder layers [start, end) loaded from safetensors and run on
                  their own; ModelInfo from config.json and the safetensors headers
    records.py    signed DHT announcements (ServerRecord), their owner key vouched for by
                  the peer's libp2p key, and their strict parsing (capped throughput)
    wire.py       the RPC interface (BlockServicer) and message framing, shared by both sides
    placement.py  choose_blocks and coverage (where a server goes), fastest_chain and
                  uncovered (how a route crosses the servers), shared by both sides
    dht.py        starting and stopping a DHT process and its p2pd daemon
    peer_proof.py PeerKey: the server's own libp2p key (p2pd's identity), which proves its
                  peer id to the coordinator
    limits.py     PeerLimits: per-peer attention-cache share and open streams
    batched.py    forward_batch: several sessions' steps (each its own cache) as one
                  batched forward, their keys left-padded and masked
    batcher.py    StepBatcher: the server's queue of steps, run in batches whenever the
                  compute is free, prompts cut into chunks
    server.py     BlockServer: the handlers (inference, forward, info), bounded sessions,
                  announcements
    routing.py    SwarmClient: the DHT client, announcements, bans and round trips, routes
                  (fastest chains of servers), stateless forward passes with rerouting
    session.py    InferenceSession: streams along a route, caches on the servers, replay
                  to a replacement on server failure, per-server usage and what each
                  server was given and answered
    checks.py     spot checks: a prefix of a server's answers recomputed on other servers,
                  compared within a tolerance, a third server deciding a disagreement

The server and the client side (routing, session) never import each other. Errors live in
`worker.errors` under `SwarmError`. The design follows Petals (servers announce block
ranges in a DHT, clients chain servers and keep a history to replay to a replacement); the
code is our own, on hivemind's DHT and P2P only.
"""

__all__: list[str] = []
