"""The coordinator's one configuration object. Only `coordinator.main` builds it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CoordinatorConfig"]


@dataclass(frozen=True)
class CoordinatorConfig:
    # where results (content-addressed PNGs) and the default SQLite file live
    data_dir: Path
    # interface and port to listen on; port 0 picks a free port (printed at start)
    host: str = "127.0.0.1"
    port: int = 8470
    # SQLAlchemy async URL; None = sqlite+aiosqlite:///<data_dir>/idlegrid.db
    database_url: str | None = None
    # fixed lease in seconds for every job; None = derived from the job's size
    lease_timeout: float | None = None
    # derived leases: this many seconds plus the job's work at a slow-GPU pace
    lease_base_seconds: float = 60.0
    # pixel-steps per second assumed for the slowest acceptable worker (derived leases)
    lease_pixel_steps_per_second: float = 512 * 512 * 0.5
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
    # largest JSON body accepted outside result uploads, and largest result upload
    max_body_bytes: int = 64 * 1024
    max_upload_bytes: int = 128 * 1024 * 1024
    # longest long-poll a worker may ask for, and the fallback re-check interval that
    # lets several coordinators on one database see each other's jobs
    max_pop_wait: float = 60.0
    poll_fallback: float = 1.0

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'idlegrid.db'}"

    def lease_seconds(self, pixels: int, steps: int, n: int) -> float:
        if self.lease_timeout is not None:
            return self.lease_timeout
        return self.lease_base_seconds + pixels * steps * n / self.lease_pixel_steps_per_second
