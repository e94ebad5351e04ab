"""`idlegrid chat` (interactive, keeps the conversation) and `idlegrid complete PROMPT`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from client.sdk import AsyncClient
from protocol.text import ChatMessage, TextParams
from protocol.validation import parse

__all__ = ["add_text_commands"]

CHAT_HELP = "type a message and Enter; /reset forgets the conversation, /exit (or Ctrl-D) quits"


def _sampling_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "stop": args.stop or [],
    }
    if args.seed is not None:
        fields["seed"] = args.seed
    if args.model:
        fields["model"] = args.model
    return fields


def _client(args: argparse.Namespace) -> AsyncClient:
    return AsyncClient(args.coordinator, args.api_key, wait_timeout=args.wait_timeout)


def _print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


async def _complete(args: argparse.Namespace) -> int:
    params = parse(TextParams, {"prompt": args.prompt, **_sampling_fields(args)})
    async with _client(args) as grid:
        status = await grid.complete(params, None if args.json else _print_piece)
    if args.json:
        print(
            json.dumps(
                {
                    "job_id": status.id,
                    "model": status.model,
                    "text": status.text,
                    "finish_reason": status.finish_reason,
                    "prompt_tokens": status.prompt_tokens,
                    "completion_tokens": status.completion_tokens,
                    "kudos_spent": status.kudos_cost,
                },
                ensure_ascii=False,
            )
        )
    else:
        print()
    return 0


async def _chat(args: argparse.Namespace) -> int:
    interactive = sys.stdin.isatty()
    history: list[ChatMessage] = []
    if args.system:
        history.append(ChatMessage(role="system", content=args.system))
    system = list(history)
    spent = 0
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    async with _client(args) as grid:
        while True:
            try:
                line = await asyncio.to_thread(input, "you> " if interactive else "")
            except EOFError:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = list(system)
                print("(conversation forgotten)", file=sys.stderr)
                continue
            turn = [*history, ChatMessage(role="user", content=text)]
            params = parse(
                TextParams,
                {"messages": [m.model_dump() for m in turn], **_sampling_fields(args)},
            )
            if interactive:
                _print_piece("bot> ")
            status = await grid.complete(params, _print_piece)
            print()
            spent += status.kudos_cost
            history = [*turn, ChatMessage(role="assistant", content=status.text)]
    if interactive:
        print(f"(spent {spent} kudos)", file=sys.stderr)
    return 0


def _add_sampling_flags(parser: argparse.ArgumentParser, *, temperature: float) -> None:
    parser.add_argument("--model", help="model name (default: the one gateways serve)")
    parser.add_argument(
        "--max-tokens", type=int, default=128, help="most new tokens (default %(default)s)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help="sampling temperature; 0 = greedy (default %(default)s)",
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default off)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling (default off)")
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="e.g. 1.1 (default off)"
    )
    parser.add_argument(
        "--stop", action="append", help="stop sequence (repeatable, up to 4)", metavar="TEXT"
    )
    parser.add_argument("--seed", type=int, help="sampling seed (default random)")


def add_text_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    add_connection_flags: Callable[[argparse.ArgumentParser], None],
    add_wait_flag: Callable[[argparse.ArgumentParser], None],
) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="chat with the swarm's LLM (interactive; streams tokens)",
        description=f"Chat with an LLM served by the swarm. {CHAT_HELP}. "
        "Lines piped on stdin are sent one by one.",
    )
    chat.add_argument("--system", help="a system message that starts the conversation")
    _add_sampling_flags(chat, temperature=0.7)
    add_wait_flag(chat)
    add_connection_flags(chat)
    chat.set_defaults(run_async=_chat)

    complete = subparsers.add_parser(
        "complete",
        help="complete a prompt once (streams tokens; --json for scripts)",
        description="Continue PROMPT with the swarm's LLM. With --temperature 0 it is greedy.",
    )
    complete.add_argument("prompt", help="text to continue")
    _add_sampling_flags(complete, temperature=0.7)
    add_wait_flag(complete)
    add_connection_flags(complete)
    complete.set_defaults(run_async=_complete)
