"""The `idlegrid` command. Client subcommands live here; `coordinator`, `worker` and
`models` plug in through the `idlegrid.commands` entry-point group, so this package never
imports the others.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from PIL import Image

from client.chat_cli import add_text_commands
from client.credentials import Credentials
from client.errors import ApiError, ClientError
from client.follow import WAIT_TIMEOUT
from client.image_extras import add_extras_flags, extras_fields
from client.loras_cli import adapter_fields, add_adapter_flags
from client.preview_file import PreviewFile
from client.progress import ProgressLine
from client.sdk import AsyncClient
from protocol.config_file import ConfigFileParser
from protocol.control import CONTROL_TYPES
from protocol.errors import ValidationFailed
from protocol.params import MAX_SIDE, MIN_SIDE, ImageParams
from protocol.samplers import DEFAULT_SAMPLER, SAMPLERS
from protocol.validation import parse

__all__ = ["main"]

DEFAULT_COORDINATOR = "http://127.0.0.1:8470"
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """Bad command-line input; the message names the flag and the fix."""


def _parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size: {text!r} is not WIDTHxHEIGHT, e.g. 512x512") from None
    return width, height


def _read_image(path: Path, flag: str) -> tuple[bytes, tuple[int, int]]:
    """The bytes of a PNG, WebP or JPEG file and its size (from its header; nothing decoded
    here: the coordinator checks the image)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "WEBP", "JPEG"]) as image:
            return data, image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise UsageError(f"{flag}: {path} is not a PNG, WebP or JPEG image") from None


def _fitted_size(size: tuple[int, int]) -> tuple[int, int]:
    """A source image's size as a job's: each side down to a multiple of 8, within
    MIN_SIDE..MAX_SIDE."""
    width, height = (min(MAX_SIDE, max(MIN_SIDE, side - side % 8)) for side in size)
    return width, height


def _client(args: argparse.Namespace) -> AsyncClient:
    wait_timeout = getattr(args, "wait_timeout", None) or WAIT_TIMEOUT
    return AsyncClient(args.coordinator, args.api_key, wait_timeout=wait_timeout)


def _seconds(text: str) -> float:
    """argparse type of --wait-timeout: positive seconds."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _add_wait_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait-timeout",
        type=_seconds,
        default=WAIT_TIMEOUT,
        metavar="SECONDS",
        help="keep waiting on the job through a coordinator restart or outage this long, "
        "then give up naming the job (default %(default)g)",
    )


async def _account_register(args: argparse.Namespace) -> int:
    async with _client(args) as grid:
        created = await grid.register(args.name, args.invite)
    args.credentials.save(args.coordinator, created.api_key)
    if args.json:
        print(created.model_dump_json())
    else:
        print(created.api_key)
        print(
            f"account {created.name} created with {created.kudos} kudos; "
            f"key saved to {args.credentials.path}",
            file=sys.stderr,
        )
    return 0


async def _account_show(args: argparse.Namespace) -> int:
    _need_key(args)
    async with _client(args) as grid:
        info = await grid.me()
    if args.json:
        print(info.model_dump_json())
    else:
        print(
            f"name:      {info.name}\n"
            f"kudos:     {info.kudos}  (available {info.available})\n"
            f"reserved:  {info.reserved}  (held for your queued and running jobs)\n"
            f"earned:    {info.earned}  (+{info.pending} pending verification)\n"
            f"spent:     {info.spent}\n"
            f"granted:   {info.granted}  ({info.unspent_grants} unspent: spendable on jobs, "
            "not transferable)\n"
            f"transferable: {info.transferable}\n"
            f"transfers: +{info.transferred_in} / -{info.transferred_out}"
        )
    return 0


async def _account_invite(args: argparse.Namespace) -> int:
    _need_key(args)
    if not 1 <= args.count <= 100:
        raise UsageError(f"--count: {args.count} is not between 1 and 100")
    async with _client(args) as grid:
        codes = await grid.invite(args.count)
    if args.json:
        print(json.dumps({"codes": codes}))
    else:
        print("\n".join(codes))
        print(
            "each code registers one account: `idlegrid account register NAME --invite CODE`",
            file=sys.stderr,
        )
    return 0


def _need_key(args: argparse.Namespace) -> None:
    if not args.api_key:
        raise UsageError(
            "no API key: pass --api-key, set IDLEGRID_API_KEY or run `idlegrid account register`"
        )


async def _account_history(args: argparse.Namespace) -> int:
    _need_key(args)
    if not 1 <= args.limit <= 500:
        raise UsageError(f"--limit: {args.limit} is not between 1 and 500")
    async with _client(args) as grid:
        page = await grid.history(args.limit)
    if args.json:
        print(page.model_dump_json())
        return 0
    for entry in page.entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.at))
        job = f" job {entry.job_id}" if entry.job_id else ""
        others = ", ".join(entry.counterparties)
        print(f"{when}  {entry.amount:+8d}  {entry.reason:<9}{job}  ({others})")
    if page.next_before is not None:
        print(f"(more: older entries before #{page.next_before})", file=sys.stderr)
    return 0


async def _account_transfer(args: argparse.Namespace) -> int:
    _need_key(args)
    if args.amount < 1:
        raise UsageError(f"AMOUNT: {args.amount} must be a positive whole number of kudos")
    async with _client(args) as grid:
        done = await grid.transfer(args.user, args.amount, args.idempotency_key)
    if args.json:
        print(done.model_dump_json())
    else:
        print(f"sent {done.amount} kudos to {done.to} (ledger entry {done.id})")
    return 0


async def _rate(args: argparse.Namespace) -> int:
    _need_key(args)
    if not 1 <= args.score <= 10:
        raise UsageError(f"SCORE: {args.score} is not between 1 and 10")
    if args.index < 0:
        raise UsageError(f"INDEX: {args.index} must be 0 or more (the first image is 0)")
    async with _client(args) as grid:
        recorded = await grid.rate(args.job_id, args.index, args.score)
    if args.json:
        print(recorded.model_dump_json())
    else:
        print(
            f"rated image {recorded.index} of job {recorded.job_id}: {recorded.score}; "
            f"earned {recorded.kudos_earned} kudos; "
            f"image now {recorded.rating:.1f} from {recorded.ratings} rating(s)"
        )
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with _client(args) as grid:
        try:
            cancelled = await grid.cancel(args.job_id)
        except ApiError as exc:
            if exc.status != 404:
                raise
            # not an image job of ours: perhaps a text job
            cancelled = await grid.cancel_text(args.job_id)
    if args.json:
        print(cancelled.model_dump_json())
    else:
        print(f"job {cancelled.id} cancelled; {cancelled.refunded} kudos refunded")
    return 0


async def _share(args: argparse.Namespace) -> int:
    _need_key(args)
    async with _client(args) as grid:
        state = await grid.share(args.job_id, not args.off)
    if args.json:
        print(state.model_dump_json())
    else:
        print(f"job {state.id} is {'shared' if state.shared else 'private'}")
    return 0


def _control_fields(args: argparse.Namespace) -> dict[str, Any]:
    """ControlNet's fields from --control, --control-image, --image-is-control and
    --return-control-map ({} without them); UsageError naming a flag that lacks another."""
    if args.control is None:
        for flag, given in (
            ("--control-image", args.control_image is not None),
            ("--image-is-control", args.image_is_control),
            ("--return-control-map", args.return_control_map),
        ):
            if given:
                raise UsageError(f"{flag} needs a control type: add --control TYPE")
        return {}
    if args.control_image is None:
        raise UsageError("--control needs the image to guide by: add --control-image FILE")
    if args.image is not None:
        raise UsageError("--image and --control-image are both source images: give one")
    if args.mask is not None:
        raise UsageError("--mask does not go with --control: ControlNet takes no mask")
    if args.strength is not None:
        raise UsageError("--strength does not apply with --control: it samples from noise")
    return {
        "control_type": args.control,
        **({"image_is_control": True} if args.image_is_control else {}),
        **({"return_control_map": True} if args.return_control_map else {}),
    }


async def _generate(args: argparse.Namespace) -> int:
    source = mask = None
    control = _control_fields(args)
    if control:
        source, source_size = _read_image(args.control_image, "--control-image")
    elif args.image is not None:
        source, source_size = _read_image(args.image, "--image")
        if args.mask is not None:
            mask, _ = _read_image(args.mask, "--mask")
    elif args.mask is not None or args.strength is not None:
        flag = "--mask" if args.mask is not None else "--strength"
        raise UsageError(f"{flag} needs a source image: add --image FILE")
    if args.size is not None:
        width, height = _parse_size(args.size)
    elif source is not None:
        width, height = _fitted_size(source_size)
    else:
        width, height = 512, 512
    fields: dict[str, Any] = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "width": width,
        "height": height,
        "steps": args.steps,
        "cfg_scale": args.cfg,
        "sampler": args.sampler,
        "n": args.n,
    }
    if args.seed is not None:
        fields["seed"] = args.seed
    if args.model:
        fields["model"] = args.model
    # the extras, sent only when asked for (their defaults are the protocol's)
    if args.clip_skip is not None:
        fields["clip_skip"] = args.clip_skip
    if args.seed_variation is not None:
        fields["seed_variation"] = args.seed_variation
    if args.tiling:
        fields["tiling"] = True
    if args.karras:
        fields["karras"] = True
    fields.update(adapter_fields(args))
    if source is not None:
        fields["source_processing"] = "img2img" if mask is None else "inpainting"
        if args.strength is not None:
            fields["denoising_strength"] = args.strength
    fields.update(extras_fields(args, UsageError))
    fields.update(control)
    params = parse(ImageParams, fields)
    if args.dry_run:
        async with _client(args) as grid:
            quote = await grid.quote_image(params)
        if args.json:
            print(quote.model_dump_json())
        else:
            eta = "unknown" if quote.eta_seconds is None else f"about {quote.eta_seconds:.0f} s"
            who = "anonymous (shared account)" if quote.anonymous else "your account"
            print(
                f"cost:     {quote.kudos_cost} kudos\n"
                f"balance:  {quote.balance} ({who}); available {quote.available}"
                f"{'' if quote.affordable else '  -- NOT ENOUGH'}\n"
                f"queue:    {quote.queue_length} waiting; this job would be at position "
                f"{quote.queue_position}\n"
                f"eta:      {eta}\n"
                "(dry run: nothing submitted)"
            )
        return 0
    progress = ProgressLine(enabled=None if not args.json else False)
    preview = None if args.preview is None else PreviewFile(args.preview)
    try:
        async with _client(args) as grid:
            result = await grid.generate(
                params,
                args.output,
                on_progress=progress,
                source_image=source,
                source_mask=mask,
                nsfw=args.nsfw,
                on_warning=lambda warning: print(f"warning: {warning}", file=sys.stderr),
                on_preview=preview,
            )
    finally:
        progress.close()
    if args.json:
        print(
            json.dumps(
                {
                    "job_id": result.job_id,
                    "seeds": result.seeds,
                    "paths": [str(p) for p in result.paths],
                    "kudos_spent": result.kudos_cost,
                }
            )
        )
    else:
        for path in result.paths:
            print(path)
    return 0


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--coordinator",
        help=f"coordinator URL (env IDLEGRID_COORDINATOR; default {DEFAULT_COORDINATOR})",
    )
    parser.add_argument(
        "--api-key",
        help="API key (env IDLEGRID_API_KEY; default: the one saved by `account register`)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idlegrid",
        description="idlegrid: generate images and chat on a volunteer compute network.",
    )
    # (ConfigFileParser: the commands that call add_config_flag read --config FILE and the
    # environment)
    parser_class: type[argparse.ArgumentParser] = ConfigFileParser
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=parser_class
    )

    account = subparsers.add_parser("account", help="register an account, show its kudos")
    account_sub = account.add_subparsers(dest="account_command", required=True, metavar="ACTION")
    register = account_sub.add_parser("register", help="create an account and print its API key")
    register.add_argument("name", help="account name (2-32 letters, digits, _ . -)")
    register.add_argument(
        "--invite", help="an invite code, where registration is invite-only (default none)"
    )
    _add_connection_flags(register)
    register.set_defaults(run_async=_account_register)
    invite = account_sub.add_parser(
        "invite", help="make single-use invite codes for invite-only registration"
    )
    invite.add_argument(
        "--count", type=int, default=1, help="how many codes, 1-100 (default %(default)s)"
    )
    _add_connection_flags(invite)
    invite.set_defaults(run_async=_account_invite)
    show = account_sub.add_parser(
        "show",
        help="print the balance and where it came from: reserved, earned, spent, unspent "
        "grants, transferable",
    )
    _add_connection_flags(show)
    show.set_defaults(run_async=_account_show)
    history = account_sub.add_parser(
        "history", help="list the account's ledger entries with reasons and job ids"
    )
    history.add_argument(
        "--limit", type=int, default=50, help="entries, newest first (default %(default)s)"
    )
    _add_connection_flags(history)
    history.set_defaults(run_async=_account_history)
    transfer = account_sub.add_parser("transfer", help="give kudos to another user")
    transfer.add_argument("user", help="the receiving account's name")
    transfer.add_argument("amount", type=int, help="whole kudos")
    transfer.add_argument(
        "--idempotency-key",
        help="retry a transfer with the same key: it never pays twice (default: a new UUID)",
    )
    _add_connection_flags(transfer)
    transfer.set_defaults(run_async=_account_transfer)

    rate = subparsers.add_parser("rate", help="rate an image 1-10 (earns a little kudos)")
    rate.add_argument("job_id", help="the job's id")
    rate.add_argument("index", type=int, help="which image, counting from 0")
    rate.add_argument("score", type=int, help="1 (bad) to 10 (excellent)")
    _add_connection_flags(rate)
    rate.set_defaults(run_async=_rate)

    cancel = subparsers.add_parser(
        "cancel", help="cancel a queued or running image or text job (refunds it)"
    )
    cancel.add_argument("job_id", help="the job's id")
    _add_connection_flags(cancel)
    cancel.set_defaults(run_async=_cancel)

    share = subparsers.add_parser("share", help="let other users see and rate a job's images")
    share.add_argument("job_id", help="the job's id")
    share.add_argument("--off", action="store_true", help="make it private again")
    _add_connection_flags(share)
    share.set_defaults(run_async=_share)

    generate = subparsers.add_parser("generate", help="generate images on the network")
    generate.add_argument("prompt", help="what the image should show")
    generate.add_argument("--negative", default="", help="what it should not show")
    generate.add_argument(
        "--seed", type=int, help="seed of the first image (random if absent; image i uses seed+i)"
    )
    generate.add_argument(
        "--steps", type=int, default=20, help="sampling steps (default %(default)s)"
    )
    generate.add_argument("--cfg", type=float, default=7.0, help="CFG scale (default %(default)s)")
    generate.add_argument(
        "--sampler",
        default=DEFAULT_SAMPLER,
        help=f"one of: {', '.join(SAMPLERS)} (default %(default)s)",
    )
    generate.add_argument(
        "--size",
        help="WIDTHxHEIGHT, multiples of 8 (default 512x512; with --image the image's size, "
        "each side down to a multiple of 8)",
    )
    generate.add_argument(
        "--image",
        type=Path,
        help="a source image (PNG, WebP or JPEG) to start from: img2img, or inpainting with --mask",
    )
    generate.add_argument(
        "--strength",
        type=float,
        help="with --image: how much is repainted, 0.01..1 (default 0.75)",
    )
    generate.add_argument(
        "--mask",
        type=Path,
        help="with --image: a mask the size of the image, white = repaint (inpainting)",
    )
    add_extras_flags(generate)
    generate.add_argument(
        "--control",
        choices=CONTROL_TYPES,
        metavar="TYPE",
        help="ControlNet: guide the image by a map made from --control-image; TYPE is one "
        f"of {', '.join(CONTROL_TYPES)}",
    )
    generate.add_argument(
        "--control-image",
        type=Path,
        help="with --control: the image (PNG, WebP or JPEG) the control map is made from "
        "(its size without --size)",
    )
    generate.add_argument(
        "--image-is-control",
        action="store_true",
        help="with --control: --control-image already is the control map",
    )
    generate.add_argument(
        "--return-control-map",
        action="store_true",
        help="with --control: return the control map made from --control-image, no image",
    )
    generate.add_argument(
        "--clip-skip",
        type=int,
        metavar="N",
        help="A1111's Clip skip: 1 (default) the text encoder's last layer, N the output "
        "N-1 layers before it (1-12)",
    )
    generate.add_argument("--tiling", action="store_true", help="seamless tiles (circular padding)")
    generate.add_argument(
        "--karras",
        action="store_true",
        help="Karras sigmas for the sampler (not DDIM, PLMS, LCM)",
    )
    generate.add_argument(
        "--seed-variation",
        type=int,
        metavar="N",
        help="image i uses seed + i x this (default 1; 1-1000)",
    )
    generate.add_argument("-n", type=int, default=1, help="number of images (default %(default)s)")
    generate.add_argument("--model", help="model name (default: whatever the workers serve)")
    generate.add_argument(
        "--nsfw",
        action="store_true",
        help="the request is NSFW (AI Horde's nsfw): needed for a model the coordinator's "
        "image model reference marks nsfw",
    )
    add_adapter_flags(generate)
    generate.add_argument(
        "-o", "--output", type=Path, default=Path("."), help="directory for the PNGs (default .)"
    )
    generate.add_argument(
        "--preview",
        type=Path,
        metavar="FILE",
        help="keep the latest live preview of the image being sampled in FILE (replaced "
        "as each arrives; a small JPEG, or PNG/WebP by FILE's suffix)",
    )
    generate.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cost, your balance, the queue and the ETA; submit nothing",
    )
    _add_wait_flag(generate)
    _add_connection_flags(generate)
    generate.set_defaults(run_async=_generate)

    add_text_commands(subparsers, _add_connection_flags, _add_wait_flag)

    for plugin in entry_points(group="idlegrid.commands"):
        try:
            register = plugin.load()
        except ImportError as exc:  # e.g. a client-only install without the worker's torch
            logging.getLogger(__name__).debug("command %s unavailable: %s", plugin.name, exc)
            continue
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "run"):  # plugged-in commands configure themselves
        return int(args.run(args))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    args.credentials = Credentials(
        Path(
            os.environ.get("IDLEGRID_CREDENTIALS") or config_home / "idlegrid" / "credentials.json"
        )
    )
    args.coordinator = (
        args.coordinator or os.environ.get("IDLEGRID_COORDINATOR") or DEFAULT_COORDINATOR
    ).rstrip("/")
    args.api_key = (
        args.api_key
        or os.environ.get("IDLEGRID_API_KEY")
        or args.credentials.api_key(args.coordinator)
    )
    try:
        return int(asyncio.run(args.run_async(args)))
    except (UsageError, ValidationFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ApiError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        for field, message in exc.fields:
            print(f"  {field}: {message}", file=sys.stderr)
        return (
            EXIT_BAD_INPUT
            if 400 <= exc.status < 500 and exc.status not in (401, 402, 403, 429)
            else EXIT_FAILED
        )
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
