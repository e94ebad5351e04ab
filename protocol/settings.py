"""One declaration per setting: flags, environment variables and config-file keys from it.

A command's settings are one pydantic model (`idlegrid coordinator`: coordinator.settings;
`idlegrid worker image|blocks|gateway`: the workers' `main` modules). Each field is one
setting: its annotation gives the type, its default the default, pydantic constraints and
validators the checks, and a `Flag` in its `Annotated` metadata the help text (and, where
argparse needs them, the metavar, the group, a text parser, `nargs`). `add_flags` turns
the model into argparse flags: the flag is the field's name with dashes (`max_pixels` ->
`--max-pixels`), the environment variable its prefix plus the flag in capitals
(`IDLEGRID_WORKER_IMAGE_MAX_PIXELS`), a config-file key the flag without dashes.

Where a value comes from, first match wins: the command line, the environment, the
config file (`--config FILE`: protocol.config_file), the default. `SettingsParser` does this in
one parse: the environment's and the file's values become the flags' defaults for that
parse (so they also satisfy required flags), and the flags given override them. `validated`
then builds the model from the parsed flags; a value pydantic refuses stops the command
with a message naming the flag, its environment variable and the fix.

Why in protocol, which does no I/O: the coordinator and the worker may not import each
other, and both need it. This module reads no file and opens no socket; the environment
is a mapping (`SettingsParser.environ`, by default `os.environ`), read only when a command
with environment variables is parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import sys
import types
import typing
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from protocol.validation import describe

__all__ = [
    "Flag",
    "SettingsError",
    "SettingsParser",
    "add_flags",
    "applied_defaults",
    "env_name",
    "flag_name",
    "resolve_option",
    "stored",
    "validated",
]

M = TypeVar("M", bound=BaseModel)

# the namespace attribute that tells `validated` which variables the parser read
ENV_PREFIXES = "settings_env_prefixes"
# actions of `Flag(stored=False)` fields
_COMMAND_LINE_ONLY: weakref.WeakSet[argparse.Action] = weakref.WeakSet()
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class SettingsError(ValueError):
    """A setting's value is unusable; the message names the flag (or variable) and the fix."""


@dataclass(frozen=True)
class Flag:
    """How a model field appears on the command line (see the module docstring)."""

    help: str
    metavar: str | None = None
    # argument group title; fields with the same title share it, in order of appearance
    group: str | None = None
    # text -> value, for types argparse cannot parse from the annotation (argparse `type`)
    parse: Callable[[str], Any] | None = None
    # "+" for a flag followed by one or more values; lists without it repeat the flag
    nargs: str | None = None
    required: bool = False
    # fields with the same key exclude each other (`key!` when one of them is required)
    exclusive: str | None = None
    choices: tuple[str, ...] | None = None
    # never echoed in error messages (API keys)
    secret: bool = False
    # False: only on the command line, never from the environment or a file (actions that
    # change something and exit, such as the coordinator's --mint)
    stored: bool = True


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(prefix: str, flag: str) -> str:
    """`IDLEGRID_COORDINATOR_` and `--trust-hold` -> `IDLEGRID_COORDINATOR_TRUST_HOLD`."""
    return prefix + flag.lstrip("-").upper().replace("-", "_")


def _unoptional(kind: Any) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return kind


def add_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    groups: dict[str, Any] | None = None,
    words: Mapping[str, str] | None = None,
) -> None:
    """The model's fields as the parser's flags (fields without a `Flag` are left out).

    `groups` (title -> argparse group) lets several commands' flags share argument groups
    made beforehand (in the order wanted); `words` fills `{name}` in help texts (a shared
    declaration used by several commands, e.g. `{kind}`)."""
    groups = {} if groups is None else groups
    exclusive: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        flag = next((m for m in info.metadata if isinstance(m, Flag)), None)
        if flag is None:
            continue
        target: Any = parser
        if flag.group is not None:
            if flag.group not in groups:
                groups[flag.group] = parser.add_argument_group(flag.group)
            target = groups[flag.group]
        if flag.exclusive is not None:
            key = flag.exclusive
            if key not in exclusive:
                exclusive[key] = target.add_mutually_exclusive_group(required=key.endswith("!"))
            target = exclusive[key]
        kind = _unoptional(info.annotation)
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        text = flag.help
        for word, value in (words or {}).items():
            text = text.replace("{" + word + "}", value)
        dest = info.alias or name  # an alias where the name is pydantic's (model_config)
        options: dict[str, Any] = {"help": text, "dest": dest}
        if flag.metavar is not None:
            options["metavar"] = flag.metavar
        if flag.required:
            options["required"] = True
        if flag.choices is not None:
            options["choices"] = flag.choices
        origin = typing.get_origin(kind)
        if kind is bool:
            options["action"] = "store_true"
        elif origin in (list, tuple, frozenset, set) and (flag.parse is None or flag.nargs):
            item = typing.get_args(kind)[0]
            options["type"] = flag.parse or _scalar_type(item)
            if flag.nargs is not None:
                options["nargs"] = flag.nargs
                options["default"] = None if default is None else list(default)
            else:
                options["action"] = "append"
                options["default"] = []
        else:
            options["type"] = flag.parse or _scalar_type(kind)
        if "default" not in options and kind is not bool:
            options["default"] = default
        action = target.add_argument(flag_name(dest), **options)
        if not flag.stored:
            _COMMAND_LINE_ONLY.add(action)


def _scalar_type(kind: Any) -> Callable[[str], Any] | None:
    if kind in (int, float, Path):
        return typing.cast(Callable[[str], Any], kind)
    return None


def validated(model: type[M], args: argparse.Namespace) -> M:
    """The model from the parsed flags; SettingsError naming the flag, its environment
    variables (and config-file key) and the fix."""
    dests = {info.alias or name: name for name, info in model.model_fields.items()}
    values = {dest: getattr(args, dest) for dest in dests if hasattr(args, dest)}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        prefixes: tuple[str, ...] = getattr(args, ENV_PREFIXES, ())
        problems = []
        for error, (field, message) in zip(exc.errors(), describe(exc, model), strict=True):
            if not error["loc"]:  # a check of several settings: its message names them
                problems.append(message)
                continue
            dest = field.split(".")[0].split("[")[0]
            flag = flag_name(dest)
            info = model.model_fields.get(dests.get(dest, dest))
            meta = next((m for m in info.metadata if isinstance(m, Flag)), None) if info else None
            # the value after the flag, as on the command line: a check's message starts
            # with it ('alice=0': use ...), a limit's ends with it (... (got 0))
            value = None
            if quoted := re.fullmatch(r"('.*?'|\".*?\"): (.*)", message, re.DOTALL):
                value, message = quoted.groups()
            elif message.endswith(")") and " (got " in message:
                message, _, value = message[:-1].rpartition(" (got ")
            if meta is not None and meta.secret:
                value = None
            stored_too = meta is None or meta.stored
            also = [env_name(p, flag) for p in prefixes] if stored_too else []
            if stored_too and getattr(args, "config", None) is not None:
                also.append(f"{flag[2:]} in {args.config}")
            where = flag if value is None else f"{flag} {value}"
            if also:
                where += f" (or {' or '.join(also)})"
            problems.append(f"{where}: {message}")
        raise SettingsError("; ".join(problems)) from None


# --- the environment and the config file as defaults for one parse -----------------------


class SettingsParser(argparse.ArgumentParser):
    """A command parser that takes values from the environment (and, in subclasses, a
    config file) before the command line; see the module docstring.

    A parser reads the environment only when `env_prefixes` is set: variables with a later
    prefix override those with an earlier one (`IDLEGRID_WORKER_` then
    `IDLEGRID_WORKER_IMAGE_`). `env_aliases` adds older names (flag -> variable) below them.
    """

    env_prefixes: tuple[str, ...] = ()
    env_aliases: Mapping[str, str] = {}
    environ: Mapping[str, str] = os.environ

    def parse_known_args(
        self, args: Iterable[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        arg_list = list(sys.argv[1:] if args is None else args)
        if not self.env_prefixes:
            return super().parse_known_args(arg_list, namespace)
        try:
            values = self.file_values(arg_list)
            for action, value in self.env_values().items():
                values.update(self._excluding(action, value))
        except SettingsError as exc:
            self.exit(2, f"error: {exc}\n")
        self.exclude_given(values, arg_list)
        with applied_defaults(self, values):
            parsed, rest = super().parse_known_args(arg_list, namespace)
        setattr(parsed, ENV_PREFIXES, self.env_prefixes)  # for `validated`'s messages
        return parsed, rest

    def _excluding(self, action: argparse.Action, value: Any) -> dict[argparse.Action, Any]:
        """`action`'s value, with the flags it excludes back at their defaults (a variable
        that says `--initial-peers` replaces a file's `new-swarm = true`)."""
        out = {action: value}
        for group in self._mutually_exclusive_groups:
            if action in group._group_actions:
                out.update((other, other.default) for other in group._group_actions)
                out[action] = value
        return out

    def exclude_given(self, values: dict[argparse.Action, Any], args: list[str]) -> None:
        """A flag given on the command line replaces the flags it excludes (from the
        environment or the file)."""
        given = set()
        for token in args:
            if token == "--":
                break
            action = resolve_option(self, token.partition("=")[0])
            if action is not None:
                given.add(action)
        for group in self._mutually_exclusive_groups:
            if any(action in given for action in group._group_actions):
                for action in group._group_actions:
                    if action not in given:
                        values.pop(action, None)

    def file_values(self, args: list[str]) -> dict[argparse.Action, Any]:
        """Values from a config file named in `args` (none here; see worker.common)."""
        return {}

    def env_names(self) -> dict[argparse.Action, list[str]]:
        """Each flag's environment variables, lowest precedence first."""
        names: dict[argparse.Action, list[str]] = {}
        for action in self._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if not longs or action.dest in ("help", "config") or not stored(action):
                continue
            names[action] = [self.env_aliases[longs[0]]] if longs[0] in self.env_aliases else []
            names[action] += [env_name(prefix, longs[0]) for prefix in self.env_prefixes]
        return names

    def known_env_names(self) -> set[str]:
        """Every variable with this parser's prefixes that some command reads (a subclass
        whose prefixes other commands share adds theirs)."""
        return {name for names in self.env_names().values() for name in names}

    def env_values(self) -> dict[argparse.Action, Any]:
        """The flags set in the environment, converted as on the command line; a variable
        with the prefix that names no setting is a SettingsError (a typo is never ignored)."""
        prefix = min(self.env_prefixes, key=len)
        known = self.known_env_names()
        for name in sorted(self.environ):
            if name.startswith(prefix) and name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]}?" if close else "see --help for the flags"
                raise SettingsError(f"{name} names no setting of {self.prog}: {hint}")
        found: dict[argparse.Action, Any] = {}
        for action, names in self.env_names().items():
            for name in names:
                if name in self.environ:
                    found[action] = _from_text(action, self.environ[name], name)
        return found


def resolve_option(parser: argparse.ArgumentParser, name: str) -> argparse.Action | None:
    """The optional action `name` means, as argparse resolves it (exact or unique prefix)."""
    if not name.startswith("--"):
        return None
    by_option = parser._option_string_actions
    if name in by_option:
        return by_option[name]
    if not parser.allow_abbrev:
        return None
    matches = {action for option, action in by_option.items() if option.startswith(name)}
    return matches.pop() if len(matches) == 1 else None


_KINDS: dict[Any, str] = {int: "not a whole number", float: "not a number"}


def stored(action: argparse.Action) -> bool:
    """Whether the environment and config files may set this flag (see `Flag.stored`)."""
    return action not in _COMMAND_LINE_ONLY


def _from_text(action: argparse.Action, text: str, variable: str) -> Any:
    """An environment variable's text as the flag's value."""
    if action.nargs == 0:  # on/off flags
        word = text.strip().lower()
        if word not in _TRUE | _FALSE:
            raise SettingsError(f"{variable}: an on/off setting: set it to 1 or 0")
        return action.const if word in _TRUE else action.default
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
    items: list[Any] = [text]
    if many and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            items = []
        if not items or not all(isinstance(i, str | int | float) for i in items):
            raise SettingsError(
                f'{variable}: a list of values: write a JSON list, e.g. ["A", "B"], or one value'
            )
    converted = []
    for item in items:
        value: Any = str(item)
        if action.type is not None:
            assert callable(action.type)
            try:
                value = action.type(value)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
                raise SettingsError(
                    f"{variable}={value!r}: {_KINDS.get(action.type) or exc}; write it as "
                    f"after {action.option_strings[-1]} on the command line"
                ) from None
        if action.choices is not None and value not in action.choices:
            allowed = ", ".join(repr(c) for c in action.choices)
            raise SettingsError(f"{variable} must be one of {allowed}")
        converted.append(value)
    return converted if many else converted[0]


@contextlib.contextmanager
def applied_defaults(
    parser: argparse.ArgumentParser, values: dict[argparse.Action, Any]
) -> Iterator[None]:
    """`values` as the actions' defaults (required flags no longer required) for one parse;
    the parser is left as it was."""
    saved = [(action, action.default, action.required) for action in values]
    groups = [(group, group.required) for group in parser._mutually_exclusive_groups]
    try:
        for action, value in values.items():
            action.default = value
            action.required = False
        for group in parser._mutually_exclusive_groups:
            if any(action in values for action in group._group_actions):
                group.required = False
        yield
    finally:
        for action, default, required in saved:
            action.default = default
            action.required = required
        for group, required in groups:
            group.required = required
