"""The worker commands' settings: a flag, an environment variable and a `--config` key each
set a value, in that order of precedence over the default; bad values name the flag."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from client.cli import build_parser
from protocol.settings import SettingsError, validated
from worker.image.main import ImageSettings
from worker.llm.blocks_main import BlocksSettings
from worker.llm.gateway.main import GatewaySettings

SHARED = ["--coordinator", "--name", "--identity", "--api-key", "--threads", "--log-level"]
SHARED += ["--model", "--model-name", "--unsandboxed", "--config"]
DONOR = ["--when", "--idle-minutes", "--idle-cpu-percent", "--idle-gpu-percent", "--schedule"]
DONOR += ["--max-jobs-per-hour"]
# every flag each command had before its settings were declared as one class
FLAGS = {
    "image": [
        *SHARED,
        *DONOR,
        *["--model-config", "--max-pixels", "--max-steps", "--job-timeout", "--max-ram"],
        "--max-vram",
    ],
    "blocks": [
        *SHARED,
        *["--blocks", "--num-blocks", "--new-swarm", "--initial-peers", "--host-maddr"],
        *["--announce-maddr", "--nat-port-map", "--announce-interval", "--record-ttl"],
        *["--drain-seconds", "--session-idle-timeout", "--cache-tokens", "--peer-cache-share"],
        "--max-streams-per-peer",
    ],
    "gateway": [
        *SHARED,
        *DONOR,
        *["--initial-peers", "--host-maddr", "--max-context", "--check-rate"],
        *["--check-tolerance", "--check-ban-seconds"],
    ],
}
REQUIRED = {
    "image": ["--coordinator", "u", "--model", "/m"],
    "blocks": ["--coordinator", "u", "--model", "/m", "--new-swarm"],
    "gateway": ["--coordinator", "u", "--model", "/m", "--initial-peers", "/ip4/1.2.3.4"],
}
MODELS: dict[str, type[BaseModel]] = {
    "image": ImageSettings,
    "blocks": BlocksSettings,
    "gateway": GatewaySettings,
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("IDLEGRID_"):
            monkeypatch.delenv(name)


def _args(command: str, *argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["worker", command, *argv])


def _settings(command: str, *argv: str) -> Any:
    return validated(MODELS[command], _args(command, *REQUIRED[command], *argv))


@pytest.mark.parametrize("command", list(FLAGS))
def test_help_lists_every_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _args(command, "--help")
    shown = set(re.findall(r"^ {2}(--[a-z-]+)", capsys.readouterr().out, re.MULTILINE))
    assert set(FLAGS[command]) <= shown


@pytest.mark.parametrize(
    ("command", "flag", "values"),
    [
        # the file's, the environment's and the flag's value, as written there
        ("image", "--max-steps", ("40", "50", "60")),
        ("blocks", "--drain-seconds", ("4.0", "5.0", "6.0")),
        ("gateway", "--check-rate", ("0.4", "0.5", "0.6")),
    ],
)
def test_flag_over_environment_over_file_over_default(
    command: str,
    flag: str,
    values: tuple[str, str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    field = flag[2:].replace("-", "_")
    kind = type(MODELS[command].model_fields[field].default)
    in_file, in_env, on_line = (kind(v) for v in values)

    def value(*argv: str) -> object:
        return getattr(_settings(command, *argv), field)

    assert value() == MODELS[command].model_fields[field].default
    config = tmp_path / "worker.toml"
    config.write_text(f"{flag[2:]} = 1\n[{command}]\n{flag[2:]} = {values[0]}\n")
    assert value("--config", str(config)) == in_file
    monkeypatch.setenv(f"IDLEGRID_WORKER_{command.upper()}_{field.upper()}", values[1])
    assert value() == in_env
    assert value("--config", str(config)) == in_env
    assert value("--config", str(config), flag, values[2]) == on_line
    assert value(flag, values[2]) == on_line


def test_the_command_wide_variable_and_the_kind_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IDLEGRID_WORKER_COORDINATOR", "http://127.0.0.1:1")
    monkeypatch.setenv("IDLEGRID_WORKER_THREADS", "3")
    monkeypatch.setenv("IDLEGRID_WORKER_GATEWAY_THREADS", "5")
    monkeypatch.setenv("IDLEGRID_WORKER_IMAGE_MODEL", "/models/sd")
    image = validated(ImageSettings, _args("image"))  # the required flags from the environment
    assert isinstance(image, ImageSettings)
    assert (image.coordinator, image.model, image.threads) == (
        "http://127.0.0.1:1",
        "/models/sd",
        3,
    )
    gateway = _settings("gateway")
    assert isinstance(gateway, GatewaySettings)
    assert gateway.threads == 5
    assert gateway.coordinator == "u"  # the flag


def test_lists_and_switches_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "IDLEGRID_WORKER_BLOCKS_HOST_MADDR", '["/ip4/0.0.0.0/tcp/1", "/ip6/::/tcp/1"]'
    )
    monkeypatch.setenv("IDLEGRID_WORKER_NAT_PORT_MAP", "yes")
    blocks = _settings("blocks")
    assert isinstance(blocks, BlocksSettings)
    assert blocks.host_maddr == ["/ip4/0.0.0.0/tcp/1", "/ip6/::/tcp/1"]
    assert blocks.nat_port_map is True
    monkeypatch.setenv("IDLEGRID_WORKER_BLOCKS_HOST_MADDR", "/ip4/0.0.0.0/tcp/2")
    assert _settings("blocks").host_maddr == ["/ip4/0.0.0.0/tcp/2"]


def test_a_flag_given_replaces_the_one_it_excludes_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IDLEGRID_WORKER_BLOCKS_NEW_SWARM", "1")
    args = _args("blocks", "--coordinator", "u", "--model", "/m")
    assert args.new_swarm is True
    args = _args("blocks", "--coordinator", "u", "--model", "/m", "--initial-peers", "/ip4/1")
    assert args.initial_peers == ["/ip4/1"]
    assert args.new_swarm is False


def test_the_old_api_key_variable_still_works_and_is_never_echoed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IDLEGRID_API_KEY", "old-key")
    assert _settings("gateway").api_key == "old-key"
    monkeypatch.setenv("IDLEGRID_WORKER_API_KEY", "new-key")
    assert _settings("gateway").api_key == "new-key"
    assert _settings("gateway", "--api-key", "flag-key").api_key == "flag-key"


@pytest.mark.parametrize(
    ("command", "argv", "says"),
    [
        (
            "image",
            ["--max-steps", "0"],
            "--max-steps 0 (or IDLEGRID_WORKER_MAX_STEPS or "
            "IDLEGRID_WORKER_IMAGE_MAX_STEPS): input should be greater than or equal to 1",
        ),
        ("image", ["--max-ram", "-1"], "--max-ram"),
        ("blocks", ["--peer-cache-share", "1.5"], "--peer-cache-share"),
        ("blocks", ["--record-ttl", "5"], "--record-ttl must be longer than --announce-interval"),
        ("blocks", ["--blocks", "0:2", "--num-blocks", "2"], "either --blocks or --num-blocks"),
        ("gateway", ["--check-tolerance", "1"], "--check-tolerance"),
        ("gateway", ["--threads", "0"], "--threads"),
    ],
)
def test_bad_values_name_the_flag(command: str, argv: list[str], says: str) -> None:
    with pytest.raises(SettingsError) as bad:
        _settings(command, *argv)
    assert says in str(bad.value)


def test_a_bad_value_in_the_file_names_the_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("[gateway]\ncheck-rate = 7\n")
    with pytest.raises(SettingsError) as bad:
        _settings("gateway", "--config", str(config))
    assert f"check-rate in {config}" in str(bad.value)


def test_a_bad_environment_variable_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IDLEGRID_WORKER_IMAGE_MAX_PIXELS", "big")
    with pytest.raises(SystemExit) as exited:
        _settings("image")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "IDLEGRID_WORKER_IMAGE_MAX_PIXELS='big': not a whole number" in err
    monkeypatch.setenv("IDLEGRID_WORKER_IMAGE_MAX_PIXELS", "4096")
    monkeypatch.setenv("IDLEGRID_WORKER_WHEN", "sometimes")
    with pytest.raises(SystemExit):
        _settings("image")
    assert "IDLEGRID_WORKER_WHEN must be one of 'always', 'idle'" in capsys.readouterr().err


def test_a_misspelt_variable_is_an_error_but_another_commands_is_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IDLEGRID_WORKER_BLOCKS_NUM_BLOCKS", "2")  # blocks' own
    monkeypatch.setenv("IDLEGRID_WORKER_NAT_PORT_MAP", "1")  # only blocks has it
    assert _settings("image").max_steps == 150
    assert _settings("blocks").num_blocks == 2
    monkeypatch.setenv("IDLEGRID_WORKER_IMAGE_MAX_STEP", "40")
    with pytest.raises(SystemExit) as exited:
        _settings("image")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "IDLEGRID_WORKER_IMAGE_MAX_STEP names no setting" in err
    assert "did you mean IDLEGRID_WORKER_IMAGE_MAX_STEPS?" in err
