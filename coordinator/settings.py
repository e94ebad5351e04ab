"""`idlegrid coordinator`'s settings: one declaration per flag (protocol.settings).

`CoordinatorSettings` is the command's one settings class: the fields below (service,
kudos economy, processes) and the open-network ones of coordinator.network_flags. Each
field is a flag (`--trust-hold`), an environment variable with the prefix `ENV_PREFIX`
(`IDLEGRID_COORDINATOR_TRUST_HOLD`) and a `--config` file key (`trust-hold = 0.3`, at the
top level or in `[coordinator]`); a flag given beats the variable, which beats the file,
which beats the default. `config()` turns them into the CoordinatorConfig the service
runs with; only coordinator.main calls it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from coordinator.config import DEFAULT_RATE_LIMITS, CoordinatorConfig, RateLimit
from coordinator.files import FILE_STORES
from coordinator.network_flags import NetworkSettings, network_config
from protocol.settings import Flag

__all__ = ["ECONOMY", "ENV_PREFIX", "CoordinatorSettings", "parse_rate_limit"]

ENV_PREFIX = "IDLEGRID_COORDINATOR_"
ECONOMY = "kudos economy (see README: The kudos economy)"
_D = CoordinatorConfig(data_dir=Path("."))


class _ServiceSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: Annotated[str, Flag("interface (default %(default)s)")] = _D.host
    port: Annotated[
        int, Field(ge=0, le=65535), Flag("port, 0 = any free (default %(default)s)")
    ] = _D.port
    data_dir: Annotated[Path, Flag("results and the SQLite file go here", required=True)]
    database_url: Annotated[
        str | None,
        Flag(
            "SQLAlchemy async URL, e.g. postgresql+asyncpg://user@host/db "
            "(default: SQLite in --data-dir)"
        ),
    ] = None
    file_store: Annotated[
        str,
        Flag(
            "where result images and uploads are kept: files in --data-dir, or rows in the "
            "database (PostgreSQL; for coordinators on several machines) (default %(default)s)",
            metavar="|".join(FILE_STORES),
        ),
    ] = _D.file_store
    lease_timeout: Annotated[
        float | None,
        Field(gt=0),
        Flag(
            "seconds a worker has to finish or report progress "
            "(default: derived from the job's size)"
        ),
    ] = None
    grant: Annotated[int, Flag("kudos for new accounts (default %(default)s)")] = (
        _D.new_account_grant
    )

    # --- kudos economy ---
    trust_worker: Annotated[
        list[str],
        Flag(
            "a worker public key (hex) trusted from the start; repeatable",
            metavar="PUBLIC_KEY",
            group=ECONOMY,
        ),
    ] = []
    trust_account: Annotated[
        list[str],
        Flag(
            "workers registered with this account's API key start trusted; repeatable",
            metavar="NAME",
            group=ECONOMY,
        ),
    ] = []
    spot_check_rate: Annotated[
        float,
        Field(ge=0, le=1),
        Flag(
            "chance that an untrusted worker's job is re-run by a trusted one "
            "(default %(default)s)",
            group=ECONOMY,
        ),
    ] = _D.spot_check_rate
    trust_hold: Annotated[
        float,
        Field(ge=0, le=1),
        Flag(
            "fraction of an untrusted worker's earnings held until verified (default %(default)s)",
            group=ECONOMY,
        ),
    ] = _D.trust_hold_fraction
    horde_hold: Annotated[
        float,
        Field(ge=0),
        Flag(
            "how long an AI Horde worker's pay is held (its results are unsigned and never "
            "checked) before it is paid, unless the requester disputes the job "
            "(default %(default)s)",
            metavar="SECONDS",
            group=ECONOMY,
        ),
    ] = _D.horde_hold_seconds
    uptime_period: Annotated[
        float,
        Field(gt=0),
        Flag(
            "seconds of uninterrupted serving that earn --uptime-reward (default %(default)s)",
            group=ECONOMY,
        ),
    ] = _D.uptime_period
    uptime_reward: Annotated[
        int, Flag("kudos per uptime period (default %(default)s)", group=ECONOMY)
    ] = _D.uptime_reward
    rating_reward: Annotated[
        int, Flag("kudos a rating earns the rater (default %(default)s)", group=ECONOMY)
    ] = _D.rating_reward
    seconds_per_doubling: Annotated[
        float,
        Flag(
            "queue head start, in seconds of waiting, per doubling of the requester's kudos "
            "(default %(default)s)",
            group=ECONOMY,
        ),
    ] = _D.priority_seconds_per_doubling
    rate_limit: Annotated[
        list[str],
        Flag(
            "requests per second and burst per API key (and per IP) for SCOPE, one of "
            f"{', '.join(DEFAULT_RATE_LIMITS)}; e.g. submit=10/100,50/500; repeatable",
            metavar="SCOPE=RATE/BURST[,IP_RATE/IP_BURST]",
            group=ECONOMY,
        ),
    ] = []

    # --- processes and streams ---
    processes: Annotated[
        int,
        Field(ge=1),
        Flag(
            "coordinator processes serving the port (SO_REUSEPORT); more than 1 needs a "
            "PostgreSQL --database-url (default %(default)s)"
        ),
    ] = _D.processes
    poll_fallback: Annotated[
        float,
        Field(gt=0),
        Flag(
            "seconds after which waiting event streams and long-polls re-read the database "
            "even without a notification (default %(default)s)"
        ),
    ] = _D.poll_fallback
    max_streams_per_key: Annotated[
        int,
        Field(ge=1),
        Flag("open event streams allowed per API key, per process (default %(default)s)"),
    ] = _D.max_streams_per_key
    max_streams_per_ip: Annotated[
        int,
        Field(ge=1),
        Flag("open event streams allowed per client address, per process (default %(default)s)"),
    ] = _D.max_streams_per_ip
    log_level: Annotated[str, Flag("logging level (default %(default)s)")] = "INFO"

    @field_validator("rate_limit")
    @classmethod
    def _rate_limits(cls, specs: list[str]) -> list[str]:
        for spec in specs:
            parse_rate_limit(spec)
        return specs

    @field_validator("file_store")
    @classmethod
    def _file_store(cls, kind: str) -> str:
        if kind not in FILE_STORES:
            raise ValueError(f"{kind!r}: use one of {', '.join(FILE_STORES)}")
        return kind


class CoordinatorSettings(NetworkSettings, _ServiceSettings):
    """Every setting of `idlegrid coordinator` (the flags in this order)."""

    def config(self, **fields: Any) -> CoordinatorConfig:
        """The service's configuration (`fields` override, e.g. in tests)."""
        limits = dict(DEFAULT_RATE_LIMITS)
        limits.update(parse_rate_limit(spec) for spec in self.rate_limit)
        values: dict[str, Any] = {
            "data_dir": self.data_dir,
            "host": self.host,
            "port": self.port,
            "database_url": self.database_url,
            "file_store": self.file_store,
            "lease_timeout": self.lease_timeout,
            "new_account_grant": self.grant,
            "trusted_workers": frozenset(self.trust_worker),
            "trusted_accounts": frozenset(self.trust_account),
            "spot_check_rate": self.spot_check_rate,
            "trust_hold_fraction": self.trust_hold,
            "horde_hold_seconds": self.horde_hold,
            "uptime_period": self.uptime_period,
            "uptime_reward": self.uptime_reward,
            "rating_reward": self.rating_reward,
            "priority_seconds_per_doubling": self.seconds_per_doubling,
            "rate_limits": limits,
            "poll_fallback": self.poll_fallback,
            "processes": self.processes,
            "max_streams_per_key": self.max_streams_per_key,
            "max_streams_per_ip": self.max_streams_per_ip,
            **network_config(self),
        }
        return CoordinatorConfig(**(values | fields))


def parse_rate_limit(spec: str) -> tuple[str, RateLimit]:
    """`SCOPE=RATE/BURST[,IP_RATE/IP_BURST]` -> (scope, limit); ValueError saying the fix.
    Without the IP part, an address gets five times a key's rate and burst."""
    try:
        scope, _, values = spec.partition("=")
        key_part, _, ip_part = values.partition(",")
        rate, burst = (float(v) for v in key_part.split("/"))
        ip_rate, ip_burst = (
            (float(v) for v in ip_part.split("/")) if ip_part else (rate * 5, burst * 5)
        )
    except ValueError:
        raise ValueError(
            f"{spec!r}: write SCOPE=RATE/BURST[,IP_RATE/IP_BURST], e.g. submit=10/100,50/500"
        ) from None
    if scope not in DEFAULT_RATE_LIMITS:
        raise ValueError(
            f"{spec!r}: unknown scope {scope!r}; use one of {', '.join(DEFAULT_RATE_LIMITS)}"
        )
    if min(rate, burst, ip_rate, ip_burst) <= 0:
        raise ValueError(f"{spec!r}: rates and bursts must be positive")
    return scope, RateLimit(rate, burst, ip_rate, ip_burst)
