"""`idlegrid worker image|blocks|gateway ...` and `idlegrid models tiny|smollm2 ...`.

The `idlegrid.commands` entry point (`register_commands`) plugs these into the one
`idlegrid` command. Each command's settings class lives beside its service
(`worker.image.main.ImageSettings`, `worker.llm.blocks_main.BlocksSettings`,
`worker.llm.gateway.main.GatewaySettings`; protocol.settings makes their flags,
IDLEGRID_WORKER_* variables and `--config` keys); heavy imports (torch, diffusers) happen
inside the commands, so `idlegrid --help` stays fast.
"""

from __future__ import annotations

import argparse

from worker.common.config_file import WorkerParser
from worker.common.controls_cli import add_status_command
from worker.common.doctor import ModelRules, add_doctor_command
from worker.image.main import add_image_command
from worker.image.model_source import PICKLE_SUFFIXES, resolve_model
from worker.llm.blocks_main import add_blocks_command
from worker.llm.gateway.main import add_gateway_command
from worker.models.main import add_models_command

__all__ = ["register_commands"]


def register_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = subparsers.add_parser("worker", help="donate this machine: serve jobs and earn kudos")
    # (WorkerParser: the commands that call add_config_flag take --config FILE)
    parser_class: type[argparse.ArgumentParser] = WorkerParser
    kinds = worker.add_subparsers(
        dest="worker_kind", required=True, metavar="KIND", parser_class=parser_class
    )
    add_image_command(kinds)
    add_blocks_command(kinds)
    add_gateway_command(kinds)
    add_status_command(kinds)
    add_doctor_command(kinds, ModelRules(resolve_model, PICKLE_SUFFIXES))
    add_models_command(subparsers)
