"""`--config FILE`: a command's flags, read from a TOML file.

A donor who runs a worker for months, or an operator a coordinator, wants the settings in a
file, not in a shell history. The file's keys are the command's long flag names, with
dashes or underscores (`max-pixels = 262144`, `max_pixels = 262144`); values have the flag's
type (a string, an integer, a number, `true`/`false` for on/off flags, a list of strings
for flags that take several values or repeat). Flags given on the command line, and the
environment (protocol.settings), override the file.

One file may serve several commands: top-level keys apply to every command that has that
flag, and the optional sections named after the commands that take `--config` (`[image]`,
`[blocks]`, `[gateway]`, `[doctor]` of `idlegrid worker`; `[coordinator]`) hold values for
one command only (a section's value overrides a top-level one). Paths are relative to the
working directory, as on the command line, and `~` is expanded for path flags. A key no
command knows, a section no command has, a value of the wrong type, and a file that cannot
be read or parsed each stop the command with exit status 2 and a message naming the file,
the key and the fix: a typo must never be silently ignored.

Why here rather than in argparse defaults: the file has to be known before the command's
own parser runs, so that values from the file also satisfy required flags (`--coordinator`,
`--model`, `--data-dir`). `ConfigFileParser` finds `--config` among its arguments, turns
the file and the environment into defaults for the length of that one parse
(`SettingsParser`), and leaves the parser as it was afterwards.

Why in protocol, which does no I/O: the coordinator and the worker may not import each
other, and both read their settings this way. Reading the one file a command names while
its flags are parsed is the only file this package opens.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.settings import SettingsError, SettingsParser, resolve_option, stored

__all__ = [
    "CONFIG_FLAG",
    "ConfigFileError",
    "ConfigFileParser",
    "add_config_flag",
    "read_config_file",
]

CONFIG_FLAG = "--config"
_UNCONFIGURABLE = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


class ConfigFileError(SettingsError):
    """The `--config` file cannot be used; the message names the file, the key and the fix.

    (Bad input from the operator: the command exits 2.)
    """


@dataclass
class _Plan:
    """What one parse takes from the file."""

    path: Path
    # the file's value of each of this command's actions, converted to the flag's type
    values: dict[argparse.Action, Any] = field(default_factory=dict)
    discouraged: list[str] = field(default_factory=list)


class ConfigFileParser(SettingsParser):
    """A command parser whose `--config FILE` supplies defaults (see the module docstring),
    below the environment's (protocol.settings).

    Command parsers are made with this class (`parser_class=` of their subparsers); only
    those that call `add_config_flag` read a file (and the environment).
    """

    config_kinds: argparse._SubParsersAction[argparse.ArgumentParser] | None = None
    # keys that work but are better kept elsewhere: key -> where
    discouraged: Mapping[str, str] = {}

    def file_values(self, args: list[str]) -> dict[argparse.Action, Any]:
        path = self._config_path(args) if self.config_kinds is not None else None
        if path is None:
            return {}
        plan = self._plan(path, args)
        for key in plan.discouraged:
            print(
                f"warning: {path}: {key} is better kept in {self.discouraged[key]} than in a "
                "file that others may read or copy",
                file=sys.stderr,
            )
        return plan.values

    # -- finding the file and what it says --------------------------------------------------

    def _config_path(self, args: list[str]) -> Path | None:
        """The last `--config FILE` (or `--config=FILE`, or an unambiguous abbreviation)."""
        found: Path | None = None
        for index, token in enumerate(args):
            if token == "--":
                break
            name, has_value, value = token.partition("=")
            action = resolve_option(self, name)
            if action is None or CONFIG_FLAG not in action.option_strings:
                continue
            if has_value:
                found = Path(value)
            elif index + 1 < len(args):
                found = Path(args[index + 1])
        return found

    def known_env_names(self) -> set[str]:
        """The variables of every command that reads this file (`IDLEGRID_WORKER_BLOCKS_...`
        is no typo for `idlegrid worker image`)."""
        known = super().known_env_names()
        if self.config_kinds is not None:
            for parser in self._sections().values():
                assert isinstance(parser, SettingsParser)
                known |= SettingsParser.known_env_names(parser)
        return known

    def _sections(self) -> dict[str, argparse.ArgumentParser]:
        """The commands that read the file, by section name (`image`, `coordinator`, ...)."""
        assert self.config_kinds is not None
        return {
            name: parser
            for name, parser in self.config_kinds.choices.items()
            if isinstance(parser, ConfigFileParser) and parser.config_kinds is not None
        }

    def _plan(self, path: Path, args: list[str]) -> _Plan:
        data = read_config_file(path)
        sections = self._sections()
        mine = next(name for name, parser in sections.items() if parser is self)
        top = {key: value for key, value in data.items() if not isinstance(value, dict)}
        tables = {key: value for key, value in data.items() if isinstance(value, dict)}
        for name in tables:
            if name not in sections:
                known = ", ".join(f"[{section}]" for section in sections)
                raise ConfigFileError(
                    f"{path}: unknown section [{name}]: use {known}, or top-level keys "
                    "for every command"
                )
        # Check every key of the file, not only this command's: a typo in another
        # command's section is found the first time any of them starts.
        top_keys = _normalized(path, top, "")
        every: dict[str, argparse.Action] = {}
        for parser in sections.values():
            every.update(_configurable(parser))
        for key in top_keys:
            if key not in every:
                raise _unknown(path, key, "", every, "")
        per_section: dict[str, dict[str, Any]] = {}
        for name, parser in sections.items():
            actions = _configurable(parser)
            own = _normalized(path, tables.get(name, {}), name)
            for key in own:
                if key not in actions:
                    raise _unknown(path, key, name, actions, parser.prog)
            merged = {k: v for k, v in top_keys.items() if k in actions} | own
            per_section[name] = {
                key: _convert(path, key, name if key in own else "", actions[key], value)
                for key, value in merged.items()
            }
        actions = _configurable(self)
        plan = _Plan(path)
        plan.values = {actions[key]: value for key, value in per_section[mine].items()}
        plan.discouraged = sorted(key for key in per_section[mine] if key in self.discouraged)
        _check_exclusive(self, plan, args)
        return plan


def add_config_flag(
    parser: argparse.ArgumentParser,
    kinds: argparse._SubParsersAction[argparse.ArgumentParser],
    help: str,
    env_prefixes: tuple[str, ...],
) -> None:
    """Give a command `--config FILE` and the environment variables with `env_prefixes`;
    call it after adding the other flags.

    `kinds` is the subparsers action the command belongs to: its other commands with
    `--config` name the file's other sections.
    """
    if not isinstance(parser, ConfigFileParser):
        raise TypeError(
            f"{parser.prog} is not a ConfigFileParser: create its subparsers with "
            "add_subparsers(parser_class=ConfigFileParser)"
        )
    parser.add_argument(CONFIG_FLAG, type=Path, metavar="FILE", help=help)
    parser.config_kinds = kinds
    parser.env_prefixes = env_prefixes


def read_config_file(path: Path) -> dict[str, Any]:
    """The parsed TOML file; ConfigFileError naming the file and the fix."""
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigFileError(
            f"{path}: no such file: check the path given to {CONFIG_FLAG}"
        ) from None
    except OSError as exc:
        raise ConfigFileError(
            f"{path}: cannot read it ({exc.strerror}): check the path given to {CONFIG_FLAG} "
            "and that this user may read it"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(
            f"{path}: not valid TOML ({exc}): write one `key = value` per line, "
            'e.g. max-pixels = 262144 or coordinator = "https://grid.example"'
        ) from None


# -- argparse actions ---------------------------------------------------------------------


def _configurable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags a file may set, by long name without dashes (`max-pixels`)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if (
            isinstance(action, _UNCONFIGURABLE)
            or CONFIG_FLAG in action.option_strings
            or not stored(action)
        ):
            continue
        for option in action.option_strings:
            if option.startswith("--"):
                actions[option[2:]] = action
    return actions


def _check_exclusive(parser: SettingsParser, plan: _Plan, args: list[str]) -> None:
    """Flags that exclude each other: at most one from the file, and one given on the
    command line replaces the file's (`--initial-peers` overrides `new-swarm = true`)."""
    parser.exclude_given(plan.values, args)
    for group in parser._mutually_exclusive_groups:
        members = group._group_actions
        chosen = [a for a in members if a in plan.values and plan.values[a] != a.default]
        if len(chosen) > 1:
            names = " and ".join(_key(action) for action in chosen)
            raise ConfigFileError(f"{plan.path}: {names} exclude each other: keep only one of them")
        for action in members:
            if action in plan.values and action not in chosen:
                plan.values.pop(action)  # e.g. new-swarm = false: as if absent


def _key(action: argparse.Action) -> str:
    return next(option[2:] for option in action.option_strings if option.startswith("--"))


# -- keys and values ----------------------------------------------------------------------


def _where(section: str) -> str:
    return f" in [{section}]" if section else ""


def _normalized(path: Path, table: dict[str, Any], section: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        if name in out:
            raise ConfigFileError(
                f"{path}: {key!r}{_where(section)} repeats another spelling of {name}: "
                "keep one of them"
            )
        out[name] = value
    return out


def _unknown(
    path: Path, key: str, section: str, actions: dict[str, argparse.Action], command: str
) -> ConfigFileError:
    if key.lstrip("-") == CONFIG_FLAG[2:]:
        return ConfigFileError(f"{path}: a config file cannot name another one: remove {key!r}")
    close = difflib.get_close_matches(key, actions, n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see --help for the flags"
    command = f"`{command}`" if command else "any command that reads this file"
    return ConfigFileError(
        f"{path}: unknown key {key!r}{_where(section)}: it is no flag of {command}; {hint}"
    )


def _convert(path: Path, key: str, section: str, action: argparse.Action, value: Any) -> Any:
    """`value` as the flag's parsed value; ConfigFileError naming the key and an example."""
    where = f"{path}: {key}{_where(section)}"
    if isinstance(action, argparse.BooleanOptionalAction):
        return _need_bool(where, key, value)
    if action.nargs == 0:  # store_true, store_false, store_const
        return action.const if _need_bool(where, key, value) else action.default
    if isinstance(action, argparse._CountAction):
        if type(value) is not int or value < 0:
            raise ConfigFileError(f"{where} must be a whole number of times, e.g. {key} = 1")
        return value
    many = (
        isinstance(action, argparse._AppendAction)
        or action.nargs in ("+", "*")
        or (isinstance(action.nargs, int) and action.nargs > 1)
    )
    if not many:
        return _scalar(where, key, action, value)
    if not isinstance(value, list):
        raise ConfigFileError(
            f"{where} takes a list, got {_kind(value)}: write {key} = [{_example(action)}]"
        )
    if action.nargs == "+" and not value:
        raise ConfigFileError(f"{where} needs at least one value: {key} = [{_example(action)}]")
    if isinstance(action.nargs, int) and len(value) != action.nargs:
        raise ConfigFileError(f"{where} takes exactly {action.nargs} values")
    return [_scalar(where, key, action, item) for item in value]


def _need_bool(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigFileError(
            f"{where} is an on/off flag and takes true or false, got {_kind(value)}: "
            f"write {key} = true"
        )
    return value


def _scalar(where: str, key: str, action: argparse.Action, value: Any) -> Any:
    kind = action.type
    converted: Any
    if kind is int:
        if type(value) is not int:
            raise _wrong(where, key, action, value, "a whole number")
        converted = value
    elif kind is float:
        if type(value) not in (int, float):
            raise _wrong(where, key, action, value, "a number")
        converted = float(value)
    elif kind is None or kind is str:
        if not isinstance(value, str):
            raise _wrong(where, key, action, value, "a string")
        converted = value
    elif kind is Path:
        if not isinstance(value, str):
            raise _wrong(where, key, action, value, "a path string")
        # what the shell does to `~` on the command line
        converted = Path(value).expanduser()
    else:
        # a custom argparse type: give it the text the command line would have given
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _wrong(where, key, action, value, "a string or a number")
        assert callable(kind)
        try:
            converted = kind(str(value))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ConfigFileError(f"{where}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        allowed = ", ".join(repr(choice) for choice in action.choices)
        raise ConfigFileError(f"{where} must be one of {allowed}")
    return converted


def _wrong(
    where: str, key: str, action: argparse.Action, value: Any, expected: str
) -> ConfigFileError:
    # never the value itself: it may be a secret (api-key)
    return ConfigFileError(
        f"{where} must be {expected}, got {_kind(value)}: write e.g. {key} = {_example(action)}"
    )


def _example(action: argparse.Action) -> str:
    """A value of the flag's type for error messages: its default where it has one."""
    default = action.default
    if isinstance(default, list) and default:
        default = default[0]
    number = isinstance(default, int | float) and not isinstance(default, bool)
    if action.type is int:
        return str(default) if type(default) is int else "1"
    if action.type is float:
        return repr(float(default)) if number else "1.0"
    if number:
        return str(default)
    if isinstance(default, str | Path):
        return f'"{default}"'
    return '"..."'


def _kind(value: Any) -> str:
    names = {bool: "true/false", int: "a whole number", float: "a number", str: "a string"}
    name = names.get(type(value))
    if name is not None:
        return name
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"
