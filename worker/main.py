"""`idlegrid worker image|blocks|gateway ...` and `idlegrid models tiny|smollm2 ...`.

The `idlegrid.commands` entry point (`register_commands`) plugs these into the one
`idlegrid` command. Each command's flags live beside its service (`worker.image.main`,
`worker.llm.blocks_main`, `worker.llm.gateway.main`, `worker.models.main`); heavy imports
(torch, diffusers) happen inside the commands, so `idlegrid --help` stays fast.
"""

from __future__ import annotations

import argparse

from worker.image.main import add_image_command
from worker.llm.blocks_main import add_blocks_command
from worker.llm.gateway.main import add_gateway_command
from worker.models.main import add_models_command

__all__ = ["register_commands"]


def register_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = subparsers.add_parser("worker", help="donate this machine: serve jobs and earn kudos")
    kinds = worker.add_subparsers(dest="worker_kind", required=True, metavar="KIND")
    add_image_command(kinds)
    add_blocks_command(kinds)
    add_gateway_command(kinds)
    add_models_command(subparsers)
