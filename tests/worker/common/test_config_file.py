"""`--config FILE` through the real `idlegrid` parser (entry points and all)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from client.cli import build_parser

ROOT = Path(__file__).resolve().parents[3]


def _write(tmp_path: Path, text: str, name: str = "worker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["worker", *argv])


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        _parse(*argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_file_values_are_used_with_their_flag_types(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = _write(
        tmp_path,
        'coordinator = "http://127.0.0.1:8470"\n'
        'model = "/models/sd"\n'
        'model-config = "~/sd-config"\n'
        "max-pixels = 262144\n"
        "max_steps = 40\n"  # underscores work too
        "job-timeout = 600\n"  # a whole number for a float flag
        "threads = 2\n"
        'log-level = "DEBUG"\n',
    )
    args = _parse("image", "--config", str(config))
    assert args.coordinator == "http://127.0.0.1:8470"
    assert args.model == "/models/sd"
    assert args.model_config == tmp_path / "sd-config"
    assert args.max_pixels == 262144
    assert args.max_steps == 40
    assert args.job_timeout == 600.0
    assert isinstance(args.job_timeout, float)
    assert args.threads == 2
    assert args.log_level == "DEBUG"
    assert args.config == config


def test_flags_on_the_command_line_override_the_file(tmp_path: Path) -> None:
    config = _write(
        tmp_path, 'coordinator = "http://127.0.0.1:1"\nmodel = "/m"\nmax-pixels = 262144\n'
    )
    # before and after --config: the command line wins either way
    args = _parse("image", "--max-pixels", "4096", "--config", str(config))
    assert args.max_pixels == 4096
    args = _parse("image", "--config", str(config), "--coordinator", "http://127.0.0.1:2")
    assert args.coordinator == "http://127.0.0.1:2"
    assert args.max_pixels == 262144


def test_required_flags_come_from_the_file_for_every_command(tmp_path: Path) -> None:
    config = _write(
        tmp_path,
        'coordinator = "http://127.0.0.1:8470"\n'
        "[image]\n"
        'model = "/models/sd"\n'
        "[blocks]\n"
        'model = "/models/llm"\n'
        "new-swarm = true\n"
        "[gateway]\n"
        'model = "/models/llm"\n'
        'initial-peers = ["/ip4/127.0.0.1/tcp/4000/p2p/QmPeer"]\n',
    )
    image = _parse("image", "--config", str(config))
    assert (image.coordinator, image.model) == ("http://127.0.0.1:8470", "/models/sd")
    blocks = _parse("blocks", "--config", str(config))
    assert blocks.model == Path("/models/llm")
    assert blocks.new_swarm is True
    assert blocks.initial_peers is None
    gateway = _parse("gateway", f"--config={config}")
    assert gateway.initial_peers == ["/ip4/127.0.0.1/tcp/4000/p2p/QmPeer"]
    assert gateway.coordinator == "http://127.0.0.1:8470"


def test_without_the_file_required_flags_are_still_required(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(tmp_path, 'coordinator = "http://127.0.0.1:1"\nmodel = "/m"\n')
    parser = build_parser()
    parser.parse_args(["worker", "image", "--config", str(config)])
    # the same parser again, without the file: nothing of the file was left behind
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "image"])
    assert "--coordinator" in capsys.readouterr().err
    args = parser.parse_args(["worker", "image", "--coordinator", "u", "--model", "m"])
    assert args.max_pixels == 1024 * 1024


def test_sections_override_top_level_keys_and_stay_in_their_command(tmp_path: Path) -> None:
    config = _write(
        tmp_path,
        'coordinator = "http://127.0.0.1:8470"\n'
        "threads = 2\n"
        "num-blocks = 4\n"  # only `blocks` has it: the image worker ignores it
        "[image]\n"
        'model = "/models/sd"\n'
        "[blocks]\n"
        'model = "/models/llm"\n'
        "threads = 6\n"
        "new-swarm = true\n",
    )
    image = _parse("image", "--config", str(config))
    assert image.threads == 2
    assert not hasattr(image, "num_blocks")
    blocks = _parse("blocks", "--config", str(config))
    assert blocks.threads == 6
    assert blocks.num_blocks == 4


def test_a_flag_given_replaces_the_one_it_excludes_in_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(
        tmp_path, 'coordinator = "http://127.0.0.1:1"\nmodel = "/m"\nnew-swarm = true\n'
    )
    args = _parse("blocks", "--config", str(config), "--initial-peers", "/ip4/127.0.0.1/tcp/1")
    assert args.new_swarm is False
    assert args.initial_peers == ["/ip4/127.0.0.1/tcp/1"]
    both = _write(
        tmp_path,
        'coordinator = "u"\nmodel = "/m"\nnew-swarm = true\ninitial-peers = ["/ip4/1.2.3.4"]\n',
        "both.toml",
    )
    err = _fails(capsys, "blocks", "--config", str(both))
    assert f"{both}: new-swarm and initial-peers exclude each other" in err


def test_unknown_keys_and_sections_are_errors_with_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    typo = _write(tmp_path, 'coordinator = "u"\nmodel = "/m"\nmax-pixel = 4096\n')
    err = _fails(capsys, "image", "--config", str(typo))
    assert f"{typo}: unknown key 'max-pixel'" in err
    assert "did you mean 'max-pixels'?" in err

    # a key another command has is still unknown inside this command's section
    wrong_section = _write(tmp_path, "[image]\nnum-blocks = 4\n", "section.toml")
    err = _fails(capsys, "image", "--config", str(wrong_section), "--coordinator", "u")
    assert "unknown key 'num-blocks' in [image]" in err
    # ... and found whichever command starts
    err = _fails(capsys, "blocks", "--config", str(wrong_section), "--new-swarm")
    assert "unknown key 'num-blocks' in [image]" in err

    section = _write(tmp_path, "[imgae]\nthreads = 1\n", "typo-section.toml")
    err = _fails(capsys, "image", "--config", str(section))
    assert "unknown section [imgae]" in err
    assert "[image]" in err

    nested = _write(tmp_path, 'config = "other.toml"\n', "nested.toml")
    assert "cannot name another one" in _fails(capsys, "image", "--config", str(nested))


@pytest.mark.parametrize(
    ("command", "line", "expected"),
    [
        ("image", 'max-pixels = "4096"', "max-pixels must be a whole number, got a string"),
        ("image", "max-pixels = 4096.5", "max-pixels must be a whole number, got a number"),
        ("image", "max-pixels = true", "max-pixels must be a whole number, got true/false"),
        ("image", "job-timeout = true", "job-timeout must be a number"),
        ("image", "model = 5", "model must be a string"),
        ("image", "model-config = 5", "model-config must be a path string"),
        ("blocks", 'new-swarm = "yes"', "new-swarm is an on/off flag and takes true or false"),
        ("blocks", 'initial-peers = "/ip4/1.2.3.4"', "initial-peers takes a list"),
        ("blocks", "initial-peers = []", "initial-peers needs at least one value"),
        ("blocks", "host-maddr = [5]", "host-maddr must be a string"),
    ],
)
def test_wrong_types_name_the_file_the_key_and_an_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, line: str, expected: str
) -> None:
    config = _write(tmp_path, line + "\n")
    err = _fails(capsys, command, "--config", str(config), "--coordinator", "u", "--model", "/m")
    assert f"error: {config}: {expected}" in err
    assert "write" in err or "at least" in err  # the fix


def test_api_key_works_with_a_warning_and_is_never_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "-igk-s3cr3t-0123456789"
    config = _write(tmp_path, f'coordinator = "u"\nmodel = "/m"\napi_key = "{secret}"\n')
    args = _parse("image", "--config", str(config))
    assert args.api_key == secret
    err = capsys.readouterr().err
    assert "IDLEGRID_API_KEY" in err
    assert secret not in err

    wrong = _write(tmp_path, 'coordinator = "u"\nmodel = "/m"\napi-key = 918273645\n', "w.toml")
    err = _fails(capsys, "image", "--config", str(wrong))
    assert "api-key must be a string" in err
    assert "918273645" not in err


def test_unusable_files_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    err = _fails(capsys, "image", "--config", str(missing))
    assert f"{missing}: no such file: check the path given to --config" in err
    err = _fails(capsys, "image", "--config", str(tmp_path))  # a directory
    assert f"{tmp_path}: cannot read it" in err
    broken = _write(tmp_path, "max-pixels = = 3\n")
    err = _fails(capsys, "image", "--config", str(broken))
    assert f"{broken}: not valid TOML" in err
    duplicate = _write(tmp_path, "max-pixels = 1\nmax_pixels = 2\n", "dup.toml")
    assert "repeats another spelling of max-pixels" in _fails(
        capsys, "image", "--config", str(duplicate)
    )


@pytest.mark.slow
def test_the_command_exits_2_on_a_bad_file(tmp_path: Path) -> None:
    """The real `idlegrid` process: exit status and message."""
    config = _write(tmp_path, 'coordinator = "u"\nmodel = "/m"\nmax-steps = "many"\n')
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", "worker", "image", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HOME": str(tmp_path)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert f"{config}: max-steps must be a whole number, got a string" in done.stderr
    assert "max-steps = 150" in done.stderr


# the README's example (every flag of `idlegrid worker image`)
README_EXAMPLE = """\
# ~/.config/idlegrid/worker.toml -- `idlegrid worker image --config ~/.config/idlegrid/worker.toml`
# Keys are the long flag names (dashes or underscores); flags on the command line win.
# Top-level keys apply to every worker command that has the flag.
coordinator = "https://grid.example.org"
log-level = "INFO"

[image]
model = "~/models/sd-1.5"                 # diffusers folder, .safetensors file or hub id
# model-config = "~/models/sd-1.5-config" # only for a single .safetensors file
model-name = "sd-1.5"
name = "studio-image"
identity = "~/.local/share/idlegrid/worker-studio-image.key"
# api-key: better in the environment (IDLEGRID_API_KEY) than here
max-pixels = 1048576
max-steps = 150
threads = 4
job-timeout = 900.0
max-ram = 12.0        # GiB
max-vram = 8.0        # GiB
unsandboxed = false
when = "idle"         # or "always"
idle-minutes = 5
idle-cpu-percent = 30
idle-gpu-percent = 10
schedule = "22:00-08:00"
max-jobs-per-hour = 20
"""


def test_the_readme_example_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = _write(tmp_path, README_EXAMPLE)
    args = _parse("image", "--config", str(config))
    assert args.coordinator == "https://grid.example.org"
    assert args.model == "~/models/sd-1.5"  # resolve_model expands it, as for the flag
    assert args.identity == tmp_path / ".local/share/idlegrid/worker-studio-image.key"
    assert (args.max_ram, args.max_vram, args.threads) == (12.0, 8.0, 4)
    assert args.when == "idle"
    assert args.unsandboxed is False
    assert args.max_jobs_per_hour == 20
    assert args.schedule is not None


def test_custom_flag_types_and_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = 'coordinator = "u"\nmodel = "/m"\n'
    bad_choice = _write(tmp_path, base + 'when = "sometimes"\n')
    err = _fails(capsys, "image", "--config", str(bad_choice))
    assert "when must be one of 'always', 'idle'" in err
    bad_value = _write(tmp_path, base + "max-jobs-per-hour = 0\n", "zero.toml")
    err = _fails(capsys, "image", "--config", str(bad_value))
    assert f"{bad_value}: max-jobs-per-hour:" in err
    bad_schedule = _write(tmp_path, base + 'schedule = "late"\n', "late.toml")
    assert f"{bad_schedule}: schedule:" in _fails(capsys, "image", "--config", str(bad_schedule))
