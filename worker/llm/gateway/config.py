"""The text gateway's one configuration object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from worker.common.donor import DonorSettings

__all__ = ["GatewayConfig"]


@dataclass(frozen=True)
class GatewayConfig:
    """The text gateway's one configuration object. Only `worker.llm.gateway.main` builds it."""

    # coordinator base URL
    coordinator: str
    # local model folder: config, tokenizer and safetensors (only the head is loaded)
    model: Path
    # the model name offered to the coordinator and looked up in the DHT
    model_name: str
    # the gateway's display name
    name: str
    # the Ed25519 identity file (created on first start)
    identity_file: Path
    # multiaddrs of swarm peers to join through
    initial_peers: tuple[str, ...]
    # where this gateway's own DHT node listens
    host_maddrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    # the owner's API key: the gateway's share goes to that account
    api_key: str | None = None
    # torch threads for the embeddings and LM head (None = torch's default)
    threads: int | None = None
    # context length offered to the coordinator (None = the model's max_position_embeddings)
    max_context: int | None = None
    # long-poll length when asking for work
    pop_wait: float = 10.0
    # at most one post of streamed text per this many seconds
    stream_interval: float = 0.05
    # share of jobs whose block servers are spot-checked (worker.llm.swarm.checks): 0.3
    # catches a server that is always wrong within 20 of its jobs with 99.9 % probability,
    # at about 9 % extra block compute (bench/text_checks.py)
    check_rate: float = 0.3
    # worst relative L2 distance per position between two servers' hidden states
    # (worker.llm.swarm.checks.DEFAULT_TOLERANCE)
    check_tolerance: float = 0.1
    # seconds a server found wrong is left out of this gateway's routes
    check_ban_seconds: float = 3600.0
    # chats served at once (each its own job, lease, stream and swarm session)
    max_sessions: int = 8
    # most tokens drafted per step for speculative decoding (worker.llm.gateway.speculative);
    # 0 = plain decoding
    draft_tokens: int = 8
    # seconds a finished chat's swarm session is kept for the same requester's next turn
    # (worker.llm.gateway.kept); below the servers' default 60 s idle timeout; 0 = off
    session_keep: float = 30.0
    # run the engine (swarm client, LM head, checks) unconfined (`--unsandboxed`)
    unsandboxed: bool = False
    # seconds one job's generation (with its checks and redos) may take in the engine
    job_timeout: float = 900.0
    # donor controls: when jobs may be taken (--when, --schedule, --max-jobs-per-hour, ...)
    donor: DonorSettings = field(default_factory=DonorSettings)
