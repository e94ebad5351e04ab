"""`idlegrid coordinator` settings that open the network to strangers safely (README "Threat
model"): the operator's text models, registration, verification, worker identities and
bounds. `NetworkSettings` declares them (protocol.settings: flag, environment variable,
check); coordinator.settings adds them to the coordinator's one settings class, and
`network_config` turns them into CoordinatorConfig fields. `--mint` and `--make-invites`
are operator actions that change the database and exit (`run_operator_actions`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from coordinator.accounts import REGISTRATION_MODES
from coordinator.config import CoordinatorConfig
from coordinator.economy.image_models import catalog_fields
from coordinator.http.addresses import parse_networks
from coordinator.store import Store
from protocol.settings import Flag

__all__ = ["NETWORK", "NetworkSettings", "network_config", "run_operator_actions"]

NETWORK = "open network (see README: Threat model)"
_D = CoordinatorConfig(data_dir=Path("."))
_BUILT_IN = ", ".join(m.name for m in _D.text_models)


class NetworkSettings(BaseModel):
    """The open-network part of the coordinator's settings (one field per flag)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- text models and their prices ---
    models: Annotated[
        Path | None,
        Flag(
            "TOML file of the text models gateways may serve and their sizes, which set "
            f"their price (README: Text models); default: built-in {_BUILT_IN}, "
            f"default model {_D.default_text_model}; and the image model reference "
            "(README: Image model reference)",
            metavar="FILE",
            group=NETWORK,
        ),
    ] = None

    allow_uncatalogued_models: Annotated[
        Literal["auto", "yes", "no"],
        Flag(
            "whether image workers may serve models the file's [[image_models]] do not "
            "list: yes, no, or auto (yes while it lists none) (default %(default)s)",
            choices=("auto", "yes", "no"),
            group=NETWORK,
        ),
    ] = "auto"

    # --- registration and grants ---
    registration: Annotated[
        str,
        Flag(
            "who may create an account: anyone (open), holders of an invite code (invite), "
            "nobody (closed) (default %(default)s)",
            metavar="|".join(REGISTRATION_MODES),
            group=NETWORK,
        ),
    ] = _D.registration
    invites_per_account: Annotated[
        int,
        Field(ge=0),
        Flag(
            "invite codes each user may make with `idlegrid account invite`; 0 = only the "
            "operator invites (default %(default)s)",
            metavar="N",
            group=NETWORK,
        ),
    ] = _D.invites_per_account
    make_invites: Annotated[
        int | None,
        Field(ge=1, le=10_000),
        Flag(
            "print N new single-use invite codes for the database of --data-dir / "
            "--database-url and exit without serving (default: serve)",
            metavar="N",
            group=NETWORK,
            stored=False,
        ),
    ] = None
    mint: Annotated[
        list[str],
        Flag(
            "give USER KUDOS new transferable kudos (the only way they come into being: "
            "README, Threat model) in the database of --data-dir / --database-url and exit "
            "without serving; repeatable (default: serve)",
            metavar="USER=KUDOS",
            group=NETWORK,
            stored=False,
        ),
    ] = []
    anonymous_reserved_per_ip: Annotated[
        int,
        Field(ge=1),
        Flag(
            "most kudos one client address may hold reserved in queued and running "
            "anonymous jobs (default %(default)s)",
            metavar="KUDOS",
            group=NETWORK,
        ),
    ] = _D.anonymous_reserved_per_ip

    # --- verification ---
    allow_same_ip_checks: Annotated[
        bool,
        Flag(
            "let a worker spot-check another seen at the same client IP (default: off, "
            "checks go to another address; turn on for a network on one host or LAN). A check "
            "never goes to a worker of the same owner either way",
            group=NETWORK,
        ),
    ] = False
    require_sandbox: Annotated[
        bool,
        Flag(
            "give image jobs only to workers whose engine runs confined: refuse workers "
            "started with --unsandboxed, and those that do not say (older versions)",
            group=NETWORK,
        ),
    ] = _D.require_sandbox
    text_check_prefix: Annotated[
        int,
        Field(ge=0),
        Flag(
            "a gateway's text spot check agrees when the two texts are equal or share "
            "their first CHARS characters (late floating-point drift); 0 = only equal texts "
            "(default %(default)s)",
            metavar="CHARS",
            group=NETWORK,
        ),
    ] = _D.text_check_prefix_chars
    max_pixel_steps_per_second: Annotated[
        float,
        Field(gt=0),
        Flag(
            "an image result faster than RATE pixel-steps per second (width x height x "
            "steps x images over the time since the lease) is suspect: it is checked and "
            "counts towards a pause; 'inf' turns the speed check off (default %(default)s)",
            metavar="RATE",
            group=NETWORK,
        ),
    ] = _D.max_pixel_steps_per_second

    # --- worker identities ---
    max_workers_per_account: Annotated[
        int,
        Field(ge=1),
        Flag(
            "most workers (native or AI Horde names) one account may have (default %(default)s)",
            metavar="N",
            group=NETWORK,
        ),
    ] = _D.max_workers_per_account
    faulted_run: Annotated[
        int,
        Field(ge=1),
        Flag(
            "pause a worker that gives back N jobs in a row without finishing one "
            "(default %(default)s)",
            metavar="N",
            group=NETWORK,
        ),
    ] = _D.faulted_run
    max_disputes_per_day: Annotated[
        int,
        Field(ge=0),
        Flag(
            "disputes of AI Horde workers' results one account may make per day "
            "(default %(default)s)",
            metavar="N",
            group=NETWORK,
        ),
    ] = _D.max_disputes_per_day
    max_dispute_share: Annotated[
        float,
        Field(ge=0, le=1),
        Flag(
            "an account may dispute at most this share (rounded up) of its finished "
            "image jobs (default %(default)s)",
            metavar="F",
            group=NETWORK,
        ),
    ] = _D.max_dispute_share

    # --- bounds, rate limits and client addresses ---
    trusted_proxy: Annotated[
        list[str],
        Flag(
            "a reverse proxy (address or network, e.g. 10.0.0.0/8) whose X-Forwarded-For "
            "names the client, for rate limits and the same-address rules; repeatable "
            "(default: none, the header is ignored)",
            metavar="CIDR",
            group=NETWORK,
        ),
    ] = []
    lease_ttl_factor: Annotated[
        float,
        Field(ge=1),
        Flag(
            "a job stays leased at most F times its work at the slowest acceptable pace "
            "after the pop, however often the worker reports (default %(default)s)",
            metavar="F",
            group=NETWORK,
        ),
    ] = _D.lease_ttl_factor

    @field_validator("registration")
    @classmethod
    def _registration(cls, mode: str) -> str:
        if mode not in REGISTRATION_MODES:
            raise ValueError(f"{mode!r}: use one of {', '.join(REGISTRATION_MODES)}")
        return mode

    @field_validator("mint")
    @classmethod
    def _mint_specs(cls, specs: list[str]) -> list[str]:
        for spec in specs:
            _mint_spec(spec)
        return specs

    @field_validator("trusted_proxy")
    @classmethod
    def _proxies(cls, specs: list[str]) -> list[str]:
        parse_networks(specs)  # ValueError names the bad one
        return [spec.strip() for spec in specs]


def network_config(settings: NetworkSettings) -> dict[str, Any]:
    """CoordinatorConfig fields of the open-network settings (reads the `--models` file)."""
    fields: dict[str, Any] = {
        "registration": settings.registration,
        "invites_per_account": settings.invites_per_account,
        "anonymous_reserved_per_ip": settings.anonymous_reserved_per_ip,
        "verify_distinct_ip": not settings.allow_same_ip_checks,
        "text_check_prefix_chars": settings.text_check_prefix,
        "require_sandbox": settings.require_sandbox,
        "max_pixel_steps_per_second": settings.max_pixel_steps_per_second,
        "max_workers_per_account": settings.max_workers_per_account,
        "faulted_run": settings.faulted_run,
        "max_disputes_per_day": settings.max_disputes_per_day,
        "max_dispute_share": settings.max_dispute_share,
        "trusted_proxies": tuple(settings.trusted_proxy),
        "lease_ttl_factor": settings.lease_ttl_factor,
        "allow_uncatalogued_models": {"auto": None, "yes": True, "no": False}[
            settings.allow_uncatalogued_models
        ],
    }
    if settings.models is not None:
        fields.update(_catalog(settings.models))
    return fields


def _catalog(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"--models {path}: cannot read it ({exc}); give a TOML file") from None
    try:
        return catalog_fields(text)
    except ValueError as exc:
        raise SystemExit(f"--models {path}: {exc}") from None


# --- operator actions: change the database and exit ---------------------------------------


def run_operator_actions(settings: NetworkSettings, config: CoordinatorConfig) -> bool:
    """Do `--mint` and `--make-invites` against the config's database, printing what was
    done; False when neither was asked for (serve)."""
    if settings.mint:
        gifts = [_mint_spec(spec) for spec in settings.mint]
        for name, amount in asyncio.run(_mint(config, gifts)):
            print(f"minted {amount} transferable kudos for {name}")
        return True
    if settings.make_invites is not None:
        for code in asyncio.run(_make_invites(config, settings.make_invites)):
            print(code)
        return True
    return False


def _mint_spec(spec: str) -> tuple[str, int]:
    name, _, amount = spec.partition("=")
    if not name or not amount.isascii() or not amount.isdigit() or int(amount) < 1:
        raise ValueError(f"{spec!r}: use USER=KUDOS, KUDOS a positive whole number")
    return name, int(amount)


async def _mint(config: CoordinatorConfig, gifts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    store: Store = await Store.open(config)
    try:
        for name, amount in gifts:
            try:
                await store.ledger.mint(name, amount)
            except ValueError as exc:
                raise SystemExit(f"--mint {name}={amount}: {exc}") from None
        return gifts
    finally:
        await store.aclose()


async def _make_invites(config: CoordinatorConfig, count: int) -> list[str]:
    store: Store = await Store.open(config)
    try:
        return await store.accounts.create_invites(count)
    finally:
        await store.aclose()
