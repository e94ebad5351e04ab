"""`idlegrid worker doctor`: a real coordinator process, real model folders, loopback
servers with a wrong clock or release, and a port where nothing listens."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from email.utils import formatdate
from pathlib import Path

import pytest
from aiohttp import web

from client.cli import main as idlegrid
from protocol.version import VERSION
from tests.procs import Proc
from worker.common.doctor import (
    Check,
    ModelRules,
    check_coordinator,
    check_device,
    check_disk,
    check_model,
    compatible,
    render,
)
from worker.image.model_source import PICKLE_SUFFIXES, resolve_model

ROOT = Path(__file__).resolve().parents[3]
RULES = ModelRules(resolve_model, PICKLE_SUFFIXES)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real coordinator process on 127.0.0.1, any free port."""
    tmp = tmp_path_factory.mktemp("coordinator")
    proc = Proc(
        ["coordinator", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp / "data")],
        tmp / "coordinator.log",
        {"HOME": str(tmp)},
    )
    try:
        yield proc.wait_for(r"listening on (http://\S+)", 60).group(1)
    finally:
        proc.stop()


def _doctor(home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", "worker", "doctor", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data")},
        timeout=120,
        check=False,
    )


def _rows(stdout: str) -> dict[str, dict[str, str]]:
    return {row["check"]: row for row in json.loads(stdout)}


def _pickled_pipeline(tiny_models: Path, tmp_path: Path) -> Path:
    """The tiny diffusers folder with its UNet weights as a pickle (.bin) file."""
    folder = tmp_path / "pickled-sd"
    shutil.copytree(tiny_models / "sd", folder)
    for weights in (folder / "unet").glob("*.safetensors"):
        weights.unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    return folder


@pytest.mark.slow
def test_a_healthy_setup_against_a_real_coordinator(
    coordinator: str, tiny_models: Path, tmp_path: Path
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        f'coordinator = "{coordinator}"\n[image]\nmodel = "{tiny_models / "sd"}"\n'
        f'[blocks]\nmodel = "{tiny_models / "llm"}"\nnew-swarm = true\n'
    )
    done = _doctor(tmp_path, "--config", str(config), "--json")
    rows = _rows(done.stdout)
    assert rows["coordinator"]["status"] == "PASS", rows
    assert f"idlegrid {VERSION}" in rows["coordinator"]["detail"]
    assert rows["clock"]["status"] == "PASS"
    assert rows[f"model ({tiny_models / 'sd'})"]["status"] == "PASS"
    assert rows[f"model ({tiny_models / 'llm'})"]["status"] == "PASS"
    assert rows["torch"]["status"] == "PASS"
    assert rows["device"]["detail"].startswith(("CUDA", "ROCm", "Apple", "CPU"))
    assert rows["sandbox"]["status"] in ("PASS", "FAIL")
    assert rows["disk"]["detail"].count("GiB free") == 1
    failed = [row for row in rows.values() if row["status"] == "FAIL"]
    assert done.returncode == (1 if failed else 0), done.stderr


@pytest.mark.slow
def test_the_table_is_aligned_and_fails_on_a_pickle_model(
    coordinator: str, tiny_models: Path, tmp_path: Path
) -> None:
    pickled = _pickled_pipeline(tiny_models, tmp_path)
    done = _doctor(tmp_path, "--coordinator", coordinator, "--model", str(pickled))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["STATUS", "CHECK", "DETAIL"]
    detail_column = lines[0].index("DETAIL")
    for line in lines[1:]:
        status = line[:6].strip()
        assert status in ("PASS", "WARN", "FAIL", ""), line
        assert line[detail_column - 2 : detail_column] == "  ", line
        assert line[detail_column] != " ", line
    model_row = next(i for i, line in enumerate(lines) if f"model ({pickled})" in line)
    assert lines[model_row].startswith("FAIL")
    assert "safetensors" in lines[model_row + 1]
    assert lines[model_row + 1].strip().startswith("fix:")


def test_pickle_weights_fail_with_the_conversion_hint(tiny_models: Path, tmp_path: Path) -> None:
    pipeline = check_model(str(_pickled_pipeline(tiny_models, tmp_path)), None, RULES)
    assert pipeline.status == "FAIL"
    assert "pickle" in pipeline.detail
    assert "convert" in pipeline.fix
    assert "safetensors" in pipeline.fix

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pytorch_model.bin").write_bytes(b"\x80\x04")
    (bare / "config.json").write_text("{}")
    row = check_model(str(bare), None, RULES)
    assert (row.status, "convert" in row.fix) == ("FAIL", True)

    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"\x80\x04")
    assert check_model(str(checkpoint), None, RULES).status == "FAIL"


def test_usable_and_unusable_models(
    tiny_models: Path, tiny_sd_single_file: Path, tmp_path: Path
) -> None:
    assert check_model(str(tiny_models / "sd"), None, RULES).status == "PASS"
    assert check_model(str(tiny_models / "llm"), None, RULES).status == "PASS"
    assert check_model(str(tiny_sd_single_file), tiny_models / "sd", RULES).status == "PASS"
    no_config = check_model(str(tiny_sd_single_file), None, RULES)
    assert no_config.status == "FAIL"
    assert "--model-config" in no_config.detail
    assert check_model(str(tmp_path), None, RULES).status == "FAIL"  # an empty folder


def test_doctor_exit_status_and_json_in_process(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--model` from the command line; the file's sections name a pickle model and a
    coordinator where nothing listens."""
    pickled = _pickled_pipeline(tiny_models, tmp_path)
    config = tmp_path / "worker.toml"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = sock.getsockname()[1]
        config.write_text(
            f'[image]\nmodel = "{pickled}"\n[gateway]\ncoordinator = "http://127.0.0.1:{port}"\n'
        )
        code = idlegrid(
            ["worker", "doctor", "--model", str(tiny_models / "llm"), "--config", str(config)]
            + ["--json"]
        )
    rows = _rows(capsys.readouterr().out)
    assert code == 1
    assert rows[f"model ({tiny_models / 'llm'})"]["status"] == "PASS"
    assert rows[f"model ({pickled})"]["status"] == "FAIL"
    assert rows["coordinator"]["status"] == "FAIL"
    assert f"127.0.0.1:{port}" in rows["coordinator"]["detail"]

    assert idlegrid(["worker", "doctor", "--json"]) in (0, 1)
    rows = _rows(capsys.readouterr().out)
    assert rows["coordinator"] == {
        "check": "coordinator",
        "status": "WARN",
        "detail": "not checked",
        "fix": "pass --coordinator URL to check it",
    }
    assert not any(row.startswith("model") for row in rows)


async def test_nothing_listening_fails() -> None:
    # a bound socket that does not listen: connections to it are refused
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        rows = await check_coordinator(f"http://127.0.0.1:{port}", wait=5)
    assert [row.check for row in rows] == ["coordinator"]
    assert rows[0].status == "FAIL"
    assert f"127.0.0.1:{port}" in rows[0].detail
    assert "--coordinator" in rows[0].fix


async def _serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _health_app(version: str, offset: float) -> web.Application:
    """A stand-in coordinator: /healthz with `version`, its clock `offset` seconds off."""

    async def healthz(request: web.Request) -> web.Response:
        response = web.json_response({"status": "ok", "version": version})
        response.headers["Date"] = formatdate(time.time() + offset, usegmt=True)
        return response

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    return app


@pytest.mark.parametrize(
    ("offset", "status"),
    [(0.0, "PASS"), (20.0, "WARN"), (-20.0, "WARN"), (120.0, "FAIL"), (-120.0, "FAIL")],
)
async def test_clock_skew_against_the_date_header(offset: float, status: str) -> None:
    async for url in _serve(_health_app(VERSION, offset)):
        rows = await check_coordinator(url, wait=5)
    assert [row.check for row in rows] == ["coordinator", "clock"]
    assert rows[0].status == "PASS"
    assert rows[1].status == status, rows[1]
    if status != "PASS":
        seconds = re.match(r"(\d+) s ", rows[1].detail)
        assert seconds is not None, rows[1]
        assert abs(int(seconds.group(1)) - abs(offset)) <= 2
        assert ("behind" if offset > 0 else "ahead") in rows[1].detail
        assert "timedatectl" in rows[1].fix


async def test_an_incompatible_release_fails() -> None:
    major, minor, _ = VERSION.split(".")
    other = f"{major}.{int(minor) + 1}.0" if major == "0" else f"{int(major) + 1}.0.0"
    async for url in _serve(_health_app(other, 0.0)):
        rows = await check_coordinator(url, wait=5)
    assert rows[0].status == "FAIL"
    assert f"runs idlegrid {other}" in rows[0].detail
    assert f"install idlegrid {other}" in rows[0].fix


async def test_something_else_at_the_url_fails() -> None:
    async for url in _serve(web.Application()):  # 404 everywhere
        rows = await check_coordinator(url, wait=5)
    assert (rows[0].status, rows[0].detail.endswith("answered HTTP 404")) == ("FAIL", True)


def test_release_compatibility() -> None:
    assert compatible("0.2.0", "0.2.7")
    assert not compatible("0.2.0", "0.3.0")
    assert compatible("1.2.0", "1.5.1")
    assert not compatible("1.2.0", "2.0.0")
    assert not compatible("0.2.0", "dev")


def test_disk_rows_one_per_filesystem(tmp_path: Path) -> None:
    paths = [("model cache", tmp_path / "hf" / "not-yet"), ("data dir", tmp_path / "data")]
    rows = check_disk(paths, warn_below=0)
    assert [(row.check, row.status) for row in rows] == [("disk", "PASS")]
    assert "model cache" in rows[0].detail
    assert "data dir" in rows[0].detail
    full = check_disk(paths, warn_below=2**62)
    assert full[0].status == "WARN"
    assert "HF_HOME" in full[0].fix


def test_device_row_names_what_torch_sees() -> None:
    rows = check_device()
    assert rows[0].check == "torch"
    assert rows[0].status == "PASS"
    assert rows[1].check == "device"
    if rows[1].detail.startswith("CPU"):
        assert f"{os.cpu_count()} cores" in rows[1].detail
        assert "GiB RAM" in rows[1].detail


def test_render_puts_fixes_under_their_rows() -> None:
    text = render([Check("a", "PASS", "fine"), Check("longer", "FAIL", "broken", "do this")])
    assert text.splitlines() == [
        "STATUS  CHECK   DETAIL",
        "PASS    a       fine",
        "FAIL    longer  broken",
        "                fix: do this",
    ]


def test_a_truncated_or_incomplete_llm_download_fails(tiny_models: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_models / "llm", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    row = check_model(str(truncated), None, RULES)
    assert row.status == "FAIL"
    assert "damaged" in row.detail

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_models / "llm", sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    row = check_model(str(sharded), None, RULES)
    assert row.status == "FAIL"
    assert "model-00002-of-00002.safetensors is missing" in row.detail
    (sharded / "model-00002-of-00002.safetensors").write_bytes(
        (sharded / "model-00001-of-00002.safetensors").read_bytes()
    )
    row = check_model(str(sharded), None, RULES)
    assert (row.status, row.detail) == ("PASS", "LLM folder with safetensors weights (2 files)")
