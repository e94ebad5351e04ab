"""The coordinator's one configuration object. Only `coordinator.main` builds it, from the
command's settings (coordinator.settings); tests build it directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from protocol.image_models import ImageModel
from protocol.priority import Aging
from protocol.text import BUILTIN_DEFAULT_MODEL, BUILTIN_TEXT_MODELS, TextModel

__all__ = ["DEFAULT_RATE_LIMITS", "CoordinatorConfig", "RateLimit"]


@dataclass(frozen=True)
class RateLimit:
    """Token buckets of one kind of request: per API key (or worker) and per IP address."""

    # sustained requests per second and burst size for one API key or worker
    per_second: float
    burst: float
    # the same for one client IP address (shared by everyone behind one NAT)
    ip_per_second: float
    ip_burst: float


# Generous: a person or a script never meets them; a flood does. One scope per kind of
# request (the `limit` of its route in coordinator.http); `--rate-limit SCOPE=...` sets any.
DEFAULT_RATE_LIMITS: dict[str, RateLimit] = {
    "submit": RateLimit(10, 100, 50, 500),  # image, text and OpenAI jobs
    "pop": RateLimit(50, 500, 200, 2000),  # image and text pops
    "rate": RateLimit(2, 60, 10, 300),
    "transfer": RateLimit(5, 50, 20, 200),
    # new accounts come with a grant: per client IP only (there is no key yet), 10 at once
    # and then one every 6 minutes
    "register": RateLimit(10 / 3600, 10, 10 / 3600, 10),
    "worker": RateLimit(1, 60, 5, 300),  # worker registration (per account and IP)
    "challenge": RateLimit(2, 60, 10, 300),  # nonces and invites: rows that others store
    "quote": RateLimit(10, 100, 50, 500),
    "stream": RateLimit(10, 100, 50, 500),  # opening an event stream (image and text)
    "cancel": RateLimit(5, 50, 20, 200),
    "share": RateLimit(2, 60, 10, 300),
    "progress": RateLimit(20, 200, 200, 2000),  # image progress reports
    "delta": RateLimit(20, 200, 200, 2000),  # streamed text
    "result": RateLimit(20, 200, 100, 1000),  # uploads, results and failures (both kinds)
    "engine": RateLimit(1, 30, 5, 150),  # engine reports
    "peer": RateLimit(1, 30, 5, 150),  # block servers' peer links
    # anonymous views of the whole network (GET /api/v1/network, /api/v2/workers, ...)
    "network": RateLimit(2, 30, 10, 100),
}


@dataclass(frozen=True)
class CoordinatorConfig:
    # where results (content-addressed PNGs) and the default SQLite file live
    data_dir: Path
    # interface and port to listen on; port 0 picks a free port (printed at start)
    host: str = "127.0.0.1"
    port: int = 8470
    # SQLAlchemy async URL; None = sqlite+aiosqlite:///<data_dir>/idlegrid.db
    database_url: str | None = None
    # where result images and upload markers are kept (coordinator.files): "local" (under
    # data_dir) or "database" (in PostgreSQL, shared by coordinators on several machines)
    file_store: str = "local"
    # fixed lease in seconds for every job; None = derived from the job's size
    lease_timeout: float | None = None
    # derived leases: this many seconds plus the job's work at a slow-GPU pace
    lease_base_seconds: float = 60.0
    # pixel-steps per second assumed for the slowest acceptable worker (derived leases)
    lease_pixel_steps_per_second: float = 512 * 512 * 0.5
    # sampler steps (at that pace) each VAE pass of an image counts as in a lease's cap
    # (coordinator.jobs.lifecycle.lease_cap): the result's decode, a source image's encode.
    # They report no step, and on a slow machine one takes as long as many steps (the tiny
    # test model's 512x512 decode on 2 CPU cores: about 40 s, 20 steps at the pace above)
    lease_vae_steps: float = 20.0
    # how often expired leases are looked for
    reap_interval: float = 1.0
    # a job that failed or lost its lease this many times is failed and refunded
    max_attempts: int = 3
    # kudos granted to every new account
    new_account_grant: int = 100
    # lowest balance a registered account may reach by spending
    account_floor: int = 0
    # anonymous requests share one account that may sink to this balance
    anonymous_floor: int = -1_000_000_000
    # limits on anonymous requests (registered accounts get the protocol's limits)
    anonymous_max_pixels: int = 512 * 512
    anonymous_max_steps: int = 30
    anonymous_max_n: int = 2
    # most new tokens an anonymous text request may ask for
    anonymous_max_tokens: int = 256
    # a text model counts as served while a gateway offered it within this many seconds
    text_model_seconds: float = 120.0
    # staged image uploads of a job that was never finished are removed after this long
    upload_max_age: float = 2 * 86400.0
    # longest long-poll a worker may ask for, and the fallback re-check interval that
    # lets several coordinators on one database see each other's jobs
    max_pop_wait: float = 60.0
    poll_fallback: float = 1.0

    # --- priority and ETA ---
    # one doubling of the requester's kudos is worth this many seconds of waiting
    priority_seconds_per_doubling: float = 60.0
    # anonymous jobs start this many seconds behind a registered job with no kudos
    anonymous_penalty_seconds: float = 600.0
    # ETAs use the throughput of jobs finished in this many recent seconds
    eta_window: float = 600.0
    # queued jobs keep the rank (effective time) they got; it is recomputed when the
    # requester's balance moves their head start by at least this many seconds
    rank_refresh_seconds: float = 2.0
    # queue positions and ETAs come from a snapshot of the queue shared by all readers,
    # taken at most this often (and never more often than 10x the time one takes)
    ranking_interval: float = 1.0

    # --- event streams (SSE) ---
    # open streams per API key (callers without a key: per client address, as one key) and
    # per client IP; one more is refused with 429
    max_streams_per_key: int = 32
    max_streams_per_ip: int = 256
    # a stream of a queued job re-sends its position at most this often
    stream_refresh_seconds: float = 2.0

    # --- ratings ---
    # kudos a rating earns the rater (from the network's grants)
    rating_reward: int = 1
    # ratings that earn kudos per rater per rolling day; later ratings still count
    rating_rewards_per_day: int = 50

    # --- uptime ---
    # a worker polling without a break for a whole period earns `uptime_reward` for it
    uptime_period: float = 3600.0
    uptime_reward: int = 10
    # a pause in polling longer than this breaks the stretch
    uptime_grace: float = 120.0
    # ... and only workers that finished a job within this many seconds earn it
    uptime_serve_window: float = 86400.0

    # --- trust and spot checks (see coordinator.economy.checks and .suspicion) ---
    # workers with these Ed25519 public keys (hex) are trusted from the start
    trusted_workers: frozenset[str] = frozenset()
    # workers registered with the API key of one of these accounts are trusted from the start
    trusted_accounts: frozenset[str] = frozenset()
    # fraction of an untrusted worker's earnings held pending until it passes a check
    trust_hold_fraction: float = 0.5
    # AI Horde workers' results are unsigned and never checked: their pay is held this long
    # (seconds), then released unless the requester disputed the job
    horde_hold_seconds: float = 86400.0
    # chance that an untrusted worker's image job is re-run by a trusted worker; halves
    # with every passed check, down to spot_check_min_rate
    spot_check_rate: float = 0.25
    spot_check_min_rate: float = 0.05
    # chance for trusted workers (keeps them honest too)
    trusted_spot_check_rate: float = 0.0
    # passed checks (and no suspicion) after which a worker becomes trusted
    trust_after_checks: int = 3
    # suspicions (failed checks, impossible speeds) that pause a worker
    pause_after_suspicions: int = 3
    # pixel-steps per second no GPU reaches (about 20x a 2024 datacenter GPU at 512x512)
    max_pixel_steps_per_second: float = 2e8
    # mean absolute pixel difference (0-255) accepted between different engine builds
    verify_tolerance: float = 3.0

    # --- rate limits: in memory with SQLite, shared by all processes on PostgreSQL ---
    rate_limits: dict[str, RateLimit] = field(default_factory=lambda: dict(DEFAULT_RATE_LIMITS))

    # --- an open network (README "Threat model"; flags in coordinator.network_flags) ---
    # the network's views (GET /api/v1/network, /api/v2/status/models, /api/v2/workers) are
    # computed at most this often (seconds) and shared by everyone who asks meanwhile
    network_view_seconds: float = 2.0

    # text models and their prices
    # the models gateways may serve, with the sizes that price them (coordinator.economy
    # .text_models; `--models FILE`); built in: the tiny `llm` and `smollm2`
    text_models: tuple[TextModel, ...] = BUILTIN_TEXT_MODELS
    # the model of requests that name none
    default_text_model: str = BUILTIN_DEFAULT_MODEL
    # the image model reference (`[[image_models]]` of `--models FILE`; coordinator.economy
    # .image_models): names pinned to a checkpoint hash, with limits, nsfw and baseline
    image_models: tuple[ImageModel, ...] = ()
    # whether workers may serve image models the reference does not list
    # (--allow-uncatalogued-models); None: only while it lists no image model
    allow_uncatalogued_models: bool | None = None

    # registration and grants
    # who may create an account: "open" (anyone), "invite" (with a single-use invite code),
    # "closed" (nobody; existing accounts keep working)
    registration: str = "open"
    # invite codes each registered user may make (POST /api/v1/invites); the operator's
    # `idlegrid coordinator --make-invites N` has no limit. 0 = only the operator invites
    invites_per_account: int = 0
    # most kudos that one client IP may hold reserved at once, in queued and running jobs,
    # on the shared anonymous account (about 16 of the largest anonymous image jobs)
    anonymous_reserved_per_ip: int = 500

    # verification
    # a spot check never goes to a worker at the checked worker's client IP (nor, always,
    # of its owner); off (`--allow-same-ip-checks`) for a network on one host or LAN
    verify_distinct_ip: bool = True
    # only serve workers whose engine runs confined (`--require-sandbox`): an image worker
    # that reports `sandboxed: false` (or nothing) is refused its engine report and its pops
    require_sandbox: bool = False
    # a text spot check agrees when the two texts are equal or share their first this many
    # characters (floating-point drift across machines can flip a near-tie late in a long
    # generation); 0 = only equal texts agree (coordinator.economy.text_checks)
    text_check_prefix_chars: int = 256

    # worker identities (coordinator.workers, coordinator.jobs.lifecycle)
    # most workers of any kind (native or AI Horde names) one account may have; a new one
    # past it is refused with 403 (new AI Horde names also take the `worker` rate limit)
    max_workers_per_account: int = 20
    # a worker that gives back this many jobs in a row without finishing one is paused
    # (drains and gateways' give-backs, often a block server's fault, do not count)
    faulted_run: int = 3
    # disputes of AI Horde workers' results one account may make per rolling day, and at
    # most this share (rounded up) of its finished image jobs
    max_disputes_per_day: int = 10
    max_dispute_share: float = 0.2

    # bounds, rate limits and client addresses
    # a lease is extended (progress, streamed text) at most until this many times the job's
    # work at the slowest acceptable pace (or its fixed lease, if longer) after the pop;
    # then the reaper takes the job back (coordinator.jobs.lifecycle.lease_cap)
    lease_ttl_factor: float = 3.0
    # the slowest text generation a lease's cap allows for, in new tokens per second
    text_min_tokens_per_second: float = 1.0
    # reverse proxies (CIDRs) whose X-Forwarded-For names the client (coordinator.http.addresses)
    trusted_proxies: tuple[str, ...] = ()

    # --- processes (coordinator.main: `--processes N` on one port, PostgreSQL only) ---
    # how many coordinator processes serve this port, and which of them this one is
    processes: int = 1
    process_index: int = 0
    # PostgreSQL LISTEN/NOTIFY channel that carries job changes between processes
    notify_channel: str = "idlegrid"

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'idlegrid.db'}"

    @property
    def aging(self) -> Aging:
        return Aging(self.priority_seconds_per_doubling, self.anonymous_penalty_seconds)

    def lease_seconds(self, pixels: int, steps: int, n: int) -> float:
        if self.lease_timeout is not None:
            return self.lease_timeout
        return self.lease_base_seconds + pixels * steps * n / self.lease_pixel_steps_per_second
