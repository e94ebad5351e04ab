"""The coordinator's settings: each flag is also an environment variable, a flag given wins,
the defaults are CoordinatorConfig's, and bad values name the flag and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from client.cli import build_parser
from coordinator.config import DEFAULT_RATE_LIMITS, CoordinatorConfig, RateLimit
from coordinator.settings import CoordinatorSettings
from protocol.settings import SettingsError, validated

ENV = "IDLEGRID_COORDINATOR_"
# every flag `idlegrid coordinator --help` listed before the flags were declared as settings
FLAGS = [
    "--host",
    "--port",
    "--data-dir",
    "--database-url",
    "--lease-timeout",
    "--grant",
    "--trust-worker",
    "--trust-account",
    "--spot-check-rate",
    "--trust-hold",
    "--horde-hold",
    "--uptime-period",
    "--uptime-reward",
    "--rating-reward",
    "--seconds-per-doubling",
    "--rate-limit",
    "--processes",
    "--poll-fallback",
    "--max-streams-per-key",
    "--max-streams-per-ip",
    "--log-level",
    "--models",
    "--registration",
    "--invites-per-account",
    "--make-invites",
    "--mint",
    "--anonymous-reserved-per-ip",
    "--allow-same-ip-checks",
    "--require-sandbox",
    "--text-check-prefix",
    "--max-pixel-steps-per-second",
    "--max-workers-per-account",
    "--faulted-run",
    "--max-disputes-per-day",
    "--max-dispute-share",
    "--trusted-proxy",
    "--lease-ttl-factor",
]


def _settings(*argv: str) -> CoordinatorSettings:
    return validated(CoordinatorSettings, build_parser().parse_args(["coordinator", *argv]))


def _config(*argv: str) -> CoordinatorConfig:
    return _settings("--data-dir", "/srv/idlegrid", *argv).config()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(ENV):
            monkeypatch.delenv(name)


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["coordinator", "--help"])
    shown = set(re.findall(r"--[a-z][a-z-]+", capsys.readouterr().out))
    assert set(FLAGS) <= shown


def test_defaults_are_the_config_defaults() -> None:
    assert _config() == CoordinatorConfig(data_dir=Path("/srv/idlegrid"))


def test_a_flag_an_environment_variable_and_their_precedence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _config("--trust-hold", "0.3").trust_hold_fraction == 0.3
    monkeypatch.setenv(f"{ENV}TRUST_HOLD", "0.7")
    monkeypatch.setenv(f"{ENV}PORT", "9001")
    monkeypatch.setenv(f"{ENV}TRUST_WORKER", '["aa", "bb"]')
    monkeypatch.setenv(f"{ENV}ALLOW_SAME_IP_CHECKS", "true")
    monkeypatch.setenv(f"{ENV}RATE_LIMIT", "submit=1/2")
    config = _config()
    assert config.trust_hold_fraction == 0.7
    assert config.port == 9001
    assert config.trusted_workers == frozenset({"aa", "bb"})
    assert config.verify_distinct_ip is False
    assert config.rate_limits["submit"] == RateLimit(1, 2, 5, 10)
    assert config.rate_limits["pop"] == DEFAULT_RATE_LIMITS["pop"]
    # the flag wins over the environment
    assert _config("--trust-hold", "0.3", "--port", "0").trust_hold_fraction == 0.3
    # a required flag may come from the environment
    monkeypatch.setenv(f"{ENV}DATA_DIR", "/var/lib/grid")
    assert _settings().config().data_dir == Path("/var/lib/grid")


def test_the_speed_check_is_a_flag_and_inf_turns_it_off() -> None:
    assert _config().max_pixel_steps_per_second == 2e8
    assert _config("--max-pixel-steps-per-second", "5e9").max_pixel_steps_per_second == 5e9
    assert _config("--max-pixel-steps-per-second", "inf").max_pixel_steps_per_second == float("inf")
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SettingsError, match="--max-pixel-steps-per-second"):
            _config("--max-pixel-steps-per-second", bad)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["--processes", "0"],
            "--processes 0 (or IDLEGRID_COORDINATOR_PROCESSES): input should "
            "be greater than or equal to 1",
        ),
        (["--trust-hold", "1.5"], "--trust-hold 1.5 (or IDLEGRID_COORDINATOR_TRUST_HOLD)"),
        (["--poll-fallback", "0"], "--poll-fallback"),
        (["--rate-limit", "nope=1/1"], "unknown scope 'nope'; use one of submit"),
        (["--rate-limit", "submit=fast"], "write SCOPE=RATE/BURST"),
        (["--trusted-proxy", "nope"], "'nope' is not an IP address or network"),
        (
            ["--registration", "maybe"],
            "--registration 'maybe' (or IDLEGRID_COORDINATOR_REGISTRATION): use one of open",
        ),
        (["--lease-ttl-factor", "0.5"], "--lease-ttl-factor"),
        (["--max-dispute-share", "2"], "--max-dispute-share"),
        (["--make-invites", "0"], "--make-invites 0: input should be greater than or equal to 1"),
        (["--mint", "alice=0"], "--mint 'alice=0': use USER=KUDOS"),
    ],
)
def test_bad_values_name_the_flag_and_the_fix(argv: list[str], says: str) -> None:
    with pytest.raises(SettingsError) as bad:
        _config(*argv)
    assert says in str(bad.value)


def test_a_bad_environment_variable_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(f"{ENV}PORT", "eighty")
    with pytest.raises(SystemExit) as exited:
        _config()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "IDLEGRID_COORDINATOR_PORT='eighty': not a whole number" in err
    assert "--port" in err


@pytest.mark.parametrize(("variable", "value"), [("MAKE_INVITES", "5"), ("MINT", "alice=5")])
def test_operator_actions_are_never_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    monkeypatch.setenv(f"{ENV}{variable}", value)
    with pytest.raises(SystemExit):
        _settings("--data-dir", "/srv/idlegrid")
    assert f"{ENV}{variable} names no setting" in capsys.readouterr().err


def test_the_description_names_the_environment_prefix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["coordinator", "--help"])
    assert "IDLEGRID_COORDINATOR_TRUST_HOLD" in capsys.readouterr().out


def test_a_config_file_below_the_environment_and_the_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(
        'data-dir = "/srv/from-file"\n'
        "trust-hold = 0.4\n"
        "port = 1\n"
        "[coordinator]\n"  # the section wins over the top level
        "port = 9100\n"
        'trust-worker = ["aa"]\n'
        'rate-limit = ["submit=1/2"]\n'
        "allow-same-ip-checks = true\n"
    )
    settings = _settings("--config", str(config))
    assert (settings.port, settings.trust_hold, settings.trust_worker) == (9100, 0.4, ["aa"])
    from_file = settings.config()
    assert from_file.data_dir == Path("/srv/from-file")
    assert from_file.rate_limits["submit"] == RateLimit(1, 2, 5, 10)
    assert from_file.verify_distinct_ip is False
    monkeypatch.setenv(f"{ENV}TRUST_HOLD", "0.5")
    assert _settings("--config", str(config)).trust_hold == 0.5
    assert _settings("--config", str(config), "--trust-hold", "0.6").trust_hold == 0.6


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("prot = 1\n", "unknown key 'prot'"),
        ("port = 'x'\n", "port must be a whole number, got a string: write e.g. port = 8470"),
        ("[worker]\nport = 1\n", "unknown section [worker]: use [coordinator]"),
        # operator actions are never settings
        ('mint = ["alice=5"]\n', "unknown key 'mint'"),
        ("make-invites = 3\n", "unknown key 'make-invites'"),
    ],
)
def test_a_bad_config_file_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exited:
        _settings("--data-dir", "/srv", "--config", str(config))
    assert exited.value.code == 2
    assert f"error: {config}: {says}" in capsys.readouterr().err


def test_a_bad_value_from_the_file_names_the_flag_and_the_key(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text("[coordinator]\nprocesses = 0\n")
    with pytest.raises(SettingsError) as bad:
        _config("--config", str(config))
    assert f"--processes 0 (or IDLEGRID_COORDINATOR_PROCESSES or processes in {config})" in str(
        bad.value
    )


def test_a_misspelt_variable_is_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(f"{ENV}PROT", "9000")
    with pytest.raises(SystemExit) as exited:
        _config()
    assert exited.value.code == 2
    assert "IDLEGRID_COORDINATOR_PROT names no setting" in capsys.readouterr().err
