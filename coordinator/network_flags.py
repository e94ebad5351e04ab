"""`idlegrid coordinator` flags that open the network to strangers safely (README "Threat
model"): the operator's text models, registration, verification and bounds. Each area
adds its flags and turns them into CoordinatorConfig fields; coordinator.main calls
`add_arguments` and `settings`.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_arguments", "settings"]


# --- text models and their prices -------------------------------------------------------


def _add_text_models(group: argparse._ArgumentGroup) -> None:
    pass


def _text_models(args: argparse.Namespace) -> dict[str, Any]:
    return {}


# --- registration and grants ------------------------------------------------------------


def _add_registration(group: argparse._ArgumentGroup) -> None:
    pass


def _registration(args: argparse.Namespace) -> dict[str, Any]:
    return {}


# --- verification -----------------------------------------------------------------------


def _add_verification(group: argparse._ArgumentGroup) -> None:
    pass


def _verification(args: argparse.Namespace) -> dict[str, Any]:
    return {}


# --- bounds, rate limits and client addresses ---------------------------------------------


def _add_bounds(group: argparse._ArgumentGroup) -> None:
    pass


def _bounds(args: argparse.Namespace) -> dict[str, Any]:
    return {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("open network (see README: Threat model)")
    for add in (_add_text_models, _add_registration, _add_verification, _add_bounds):
        add(group)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """CoordinatorConfig fields from the flags (SystemExit naming the flag on bad values)."""
    return {
        **_text_models(args),
        **_registration(args),
        **_verification(args),
        **_bounds(args),
    }
