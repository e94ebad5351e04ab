"""End to end with real processes on loopback: coordinator, image workers, the CLI.

Images must be pixel-identical to a direct diffusers call with the same seed; a killed
worker's job must finish elsewhere and be paid once; an engine crash must not kill the
worker.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from client.sdk import Client
from protocol.messages import JobStatus
from protocol.params import ImageParams
from tests.procs import Proc, assert_confined, sandboxed_engine
from tests.reference import plain_image, plain_images, plain_pipeline

pytestmark = pytest.mark.slow


def image_worker_args(url: str, models: Path, tmp: Path, name: str) -> list[str]:
    """`idlegrid worker image` on the tiny SD model, its identity file in `tmp`."""
    return [
        "worker",
        "image",
        "--coordinator",
        url,
        "--model",
        str(models / "sd"),
        "--name",
        name,
        "--identity",
        str(tmp / f"{name}.key"),
        "--threads",
        "1",
    ]


class Network:
    def __init__(
        self,
        tmp: Path,
        models: Path,
        lease_timeout: float | None,
        require_sandbox: bool = False,
        coordinator_args: Sequence[str] = (),
    ) -> None:
        """`lease_timeout`: a fixed lease for every job, or None for the coordinator's
        default (derived from each job's size); `coordinator_args`: more of its flags."""
        self.tmp = tmp
        self.models = models
        self.procs: list[Proc] = []
        args = ["coordinator", "--port", "0", "--data-dir", str(tmp / "data")]
        if lease_timeout is not None:
            args += ["--lease-timeout", str(lease_timeout)]
        if require_sandbox:
            args.append("--require-sandbox")
        args += coordinator_args
        self.coordinator = self.start("coordinator", args)
        try:
            self.url = self.coordinator.wait_for(r"listening on (http://\S+)", 60).group(1)
        except BaseException:
            self.close()  # no process outlives a failed set-up
            raise
        self.env = {"IDLEGRID_CREDENTIALS": str(tmp / "credentials.json")}

    def start(self, label: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(args, self.tmp / f"{label}-{len(self.procs)}.log", env)
        self.procs.append(proc)
        return proc

    def sandboxed(self, worker: Proc) -> bool | None:
        """What the worker's engine report told the coordinator."""
        worker_id = worker.wait_for(r"worker id ([0-9a-f]{32})", 5).group(1)
        with Client(self.url) as grid:
            for _ in range(100):  # the report follows the "ready" line
                engine = grid.worker(worker_id).engine
                if engine is not None:
                    return engine.sandboxed
                time.sleep(0.1)
        raise AssertionError("the worker never reported its engine")

    def worker_args(self, name: str) -> list[str]:
        return image_worker_args(self.url, self.models, self.tmp, name)

    def worker(self, name: str, api_key: str | None = None) -> Proc:
        args = self.worker_args(name)
        if api_key:
            args.append(f"--api-key={api_key}")  # (a key may start with "-")
        proc = self.start(name, args)
        proc.wait_for("ready", 180)
        return proc

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "client.cli", *args, "--coordinator", self.url],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=120,
            check=False,
        )

    def register(self, name: str) -> str:
        done = self.cli("account", "register", name, "--json")
        assert done.returncode == 0, done.stderr
        return str(json.loads(done.stdout)["api_key"])

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def network(tmp_path: Path, tiny_models: Path) -> Iterator[Network]:
    net = Network(tmp_path, tiny_models, lease_timeout=5)
    try:
        yield net
    finally:
        net.close()


def _direct_diffusers(sd: Path, params: ImageParams, seed: int) -> np.ndarray:
    """The same image made with plain diffusers, in this process, on one thread like the worker."""
    import torch

    torch.set_num_threads(1)
    return plain_image(plain_pipeline(sd), params, seed)


def _direct_batch(sd: Path, params: ImageParams, seeds: list[int]) -> list[np.ndarray]:
    """A job's images as plain diffusers makes them in one batch (the worker batches a
    job's images: worker.image.batch), on one thread like the worker."""
    import torch

    torch.set_num_threads(1)
    return plain_images(plain_pipeline(sd), params, seeds)


def test_cli_generates_images_identical_to_plain_diffusers(
    network: Network, tiny_models: Path
) -> None:
    network.worker("painter")
    network.register("alice")
    out = network.tmp / "out"
    done = network.cli(
        "generate",
        "a lighthouse in a storm",
        "--negative",
        "blurry",
        "--seed",
        "1234",
        "-n",
        "2",
        "--steps",
        "4",
        "--size",
        "64x64",
        "--cfg",
        "6.5",
        "--sampler",
        "DPM++ 2M Karras",
        "-o",
        str(out),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["seeds"] == [1234, 1235]
    assert report["kudos_spent"] == 1
    assert len(report["paths"]) == 2
    params = ImageParams(
        prompt="a lighthouse in a storm",
        negative_prompt="blurry",
        width=64,
        height=64,
        steps=4,
        cfg_scale=6.5,
        sampler="DPM++ 2M Karras",
    )
    expected = _direct_batch(tiny_models / "sd", params, [1234, 1235])
    for index, path in enumerate(report["paths"]):
        png = Image.open(path)
        assert isinstance(png, PngImageFile)
        assert png.size == (64, 64)
        text = png.text["parameters"]
        assert text.startswith("a lighthouse in a storm\nNegative prompt: blurry\n")
        assert f"Seed: {1234 + index}" in text and "Sampler: DPM++ 2M Karras" in text
        assert np.array_equal(np.asarray(png.convert("RGB")), expected[index])
    shown = network.cli("account", "show", "--json")
    assert json.loads(shown.stdout)["kudos"] == 99


def _wait_running(grid: Client, job_id: str, timeout: float = 120) -> JobStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = grid.job(job_id)
        if status.state == "leased" and status.step >= 1:
            return status
        assert not status.finished, status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never started")


# Long enough to be killed mid-job: 150 steps of a 32x32 latent (256x256 pixels at SD's
# latent scale factor of 8).
LONG: dict[str, Any] = {
    "prompt": "a very slow painting",
    "width": 256,
    "height": 256,
    "steps": 150,
    "seed": 9,
}


def test_killed_worker_job_completes_elsewhere_and_is_paid_once(network: Network) -> None:
    key_a, key_b = network.register("owner-a"), network.register("owner-b")
    requester = network.register("requester")
    first = network.worker("doomed", key_a)
    with Client(network.url, requester) as grid:
        created = grid.submit_image(ImageParams(**LONG))
        _wait_running(grid, created.id)
        first.kill(signal.SIGKILL)
        network.worker("rescuer", key_b)
        final = grid.wait(created.id)
        assert final.state == "done"
        assert final.attempts == 1  # one lease lost, then done
        assert grid.me().kudos == 100 - created.kudos_cost
    with Client(network.url, key_a) as owner_a, Client(network.url, key_b) as owner_b:
        assert owner_a.me().kudos == 100
        # a new (untrusted) worker gets part of its pay now, the rest held until verified
        paid = owner_b.me()
        assert paid.kudos + paid.pending == 100 + created.kudos_cost
        assert paid.earned + paid.pending == created.kudos_cost


def test_engine_crash_requeues_the_job_and_the_worker_keeps_serving(network: Network) -> None:
    worker = network.worker("sturdy")
    with Client(network.url, network.register("requester")) as grid:
        created = grid.submit_image(ImageParams(**{**LONG, "steps": 100}))
        _wait_running(grid, created.id)
        _engine_of(worker).kill()
        final = grid.wait(created.id)
        assert final.state == "done"
        assert final.attempts == 1
        assert worker.popen.poll() is None
        image = Image.open(io.BytesIO(grid.image(created.id, 0)))
        assert image.size == (256, 256)
    assert f"engine failed on job {created.id}" in worker.output()


def _engine_of(worker: Proc) -> psutil.Process:
    return psutil.Process(sandboxed_engine(worker.pid))


def test_the_engine_of_a_running_worker_is_confined(network: Network) -> None:
    """The issue's check, from the host's /proc: no_new_privs, a seccomp filter, and its own
    mount, pid, user and network namespaces; and it still serves."""
    worker = network.worker("confined")
    assert_confined(sandboxed_engine(worker.pid), worker.pid, ("mnt", "pid", "user", "net"))
    with Client(network.url, network.register("requester")) as grid:
        created = grid.submit_image(ImageParams(**{**LONG, "steps": 2}))
        assert grid.wait(created.id).state == "done"
    assert network.sandboxed(worker) is True


def test_without_confinement_the_worker_says_what_is_missing_and_exits(
    network: Network, tmp_path: Path
) -> None:
    missing = tmp_path / "no-bwrap-here"
    proc = network.start(
        "unconfinable", network.worker_args("unconfinable"), env={"IDLEGRID_BWRAP": str(missing)}
    )
    assert proc.popen.wait(60) == 2
    said = proc.output()
    assert "bubblewrap (bwrap) is not on" in said and "apt-get install bubblewrap" in said
    assert "--unsandboxed" in said


def test_unsandboxed_runs_loudly_and_a_strict_coordinator_refuses_it(
    network: Network, tmp_path: Path
) -> None:
    args = [*network.worker_args("daring"), "--unsandboxed"]
    proc = network.start("daring", args, env={"IDLEGRID_BWRAP": str(tmp_path / "none")})
    proc.wait_for("ready", 180)
    assert "running UNSANDBOXED" in proc.output()
    assert _engine_of(proc).pid  # an engine, but in the worker's own namespaces
    assert network.sandboxed(proc) is False
    proc.stop()

    (tmp_path / "strict").mkdir()
    strict = Network(tmp_path / "strict", network.models, lease_timeout=5, require_sandbox=True)
    try:
        refused = strict.start("daring", [*strict.worker_args("daring"), "--unsandboxed"])
        refused.wait_for("serves only workers whose engine runs confined", 180)
    finally:
        strict.close()


# --- the default size: 512x512 images go up as raw PNG uploads of a few hundred KB -------


@pytest.fixture
def roomy_network(tmp_path: Path, tiny_models: Path) -> Iterator[Network]:
    """A network whose leases outlast a 512x512 step on a slow CPU (one step sends no
    progress report, so nothing would extend a short lease)."""
    net = Network(tmp_path, tiny_models, lease_timeout=600)
    try:
        yield net
    finally:
        net.close()


def test_512_images_are_uploaded_paid_once_and_identical_to_plain_diffusers(
    roomy_network: Network, tiny_models: Path
) -> None:
    """Two default-size images of one job through the CLI: both uploaded (each a PNG of a
    few hundred KB), the first pixel-identical to plain diffusers, the worker paid once."""
    network = roomy_network
    owner = network.register("owner")
    network.worker("painter", owner)
    requester = network.register("alice")
    out = network.tmp / "out"
    done = network.cli(
        "generate",
        "a lighthouse",
        "--seed",
        "77",
        "--steps",
        "1",
        "--size",
        "512x512",
        "-n",
        "2",
        "-o",
        str(out),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["seeds"] == [77, 78]
    pngs = [PngImageFile(path) for path in report["paths"]]
    assert [png.size for png in pngs] == [(512, 512)] * 2
    assert "Seed: 77" in pngs[0].text["parameters"] and "Seed: 78" in pngs[1].text["parameters"]
    first, second = (np.asarray(png.convert("RGB")) for png in pngs)
    assert not np.array_equal(first, second)
    params = ImageParams(prompt="a lighthouse", width=512, height=512, steps=1)
    assert np.array_equal(first, _direct_batch(tiny_models / "sd", params, [77, 78])[0])
    with Client(network.url, requester) as grid:
        (job,) = [e for e in grid.history().entries if e.reason == "reserve"]
        assert job.job_id is not None
        final = grid.job(job.job_id)
        assert final.state == "done" and final.attempts == 0
        assert grid.me().kudos == 100 - final.kudos_cost
    with Client(network.url, owner) as paid:
        me = paid.me()
        assert me.kudos + me.pending == 100 + final.kudos_cost


def horde(url: str, method: str, path: str, key: str, body: Any = None) -> tuple[int, Any]:
    """One AI Horde v2 call, as their clients make it."""
    request = urllib.request.Request(
        f"{url}/api/v2{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={
            "apikey": key,
            "Client-Agent": "e2e:1:loopback",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_an_ai_horde_client_and_an_ai_horde_worker_over_real_http(
    network: Network, tiny_models: Path
) -> None:
    """AI Horde's client side against a real coordinator and a real image worker (the image
    identical to plain diffusers), then AI Horde's worker side serving the same queue."""
    painter = network.worker("painter")
    alice, owner = network.register("alice"), network.register("bridge-owner")
    ask = {
        "prompt": "a lighthouse ### fog",
        "params": {"sampler_name": "k_euler", "seed": "5", "width": 64, "height": 64, "steps": 4},
    }
    status, created = horde(network.url, "POST", "/generate/async", alice, ask)
    assert status == 202 and isinstance(created["kudos"], float)
    deadline = time.monotonic() + 120
    while True:
        status, check = horde(network.url, "GET", f"/generate/check/{created['id']}", alice)
        assert status == 200, check  # never a 4xx while the job lives
        if check["done"]:
            break
        assert time.monotonic() < deadline, check
        time.sleep(0.2)
    assert check["finished"] == 1 and check["faulted"] is False
    _, done = horde(network.url, "GET", f"/generate/status/{created['id']}", alice)
    (generation,) = done["generations"]
    assert generation["worker_name"] == "painter" and generation["seed"] == "5"
    with urllib.request.urlopen(generation["img"], timeout=30) as response:  # no key needed
        image = Image.open(io.BytesIO(response.read()))
        assert "Negative prompt: fog" in image.info["parameters"]
        pixels = np.asarray(image.convert("RGB"))
    params = ImageParams(
        prompt="a lighthouse",
        negative_prompt="fog",
        width=64,
        height=64,
        steps=4,
        sampler="Euler",
        cfg_scale=7.5,  # AI Horde's default
    )
    assert np.array_equal(pixels, _direct_diffusers(tiny_models / "sd", params, 5))
    _, me = horde(network.url, "GET", "/find_user", alice)
    assert me["username"].startswith("alice#") and me["kudos"] == 100.0 - created["kudos"]

    # AI Horde's worker side: with our worker gone, a bridge serves the next request
    painter.stop()
    status, created = horde(network.url, "POST", "/generate/async", alice, ask)
    pop = {"name": "bridge-1", "models": [], "max_pixels": 512 * 512}
    # (the painter's last long-poll may still lease it; its lease then runs out)
    deadline = time.monotonic() + 30
    while True:
        status, leased = horde(network.url, "POST", "/generate/pop", owner, pop)
        assert status == 200, leased
        if leased["id"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert leased["id"] == created["id"]
    assert leased["payload"]["prompt"] == "a lighthouse ### fog"
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(out, format="WEBP", lossless=True)
    submit = {
        "id": leased["id"],
        "seed": 5,
        "generation": base64.b64encode(out.getvalue()).decode(),
    }
    status, reward = horde(network.url, "POST", "/generate/submit", owner, submit)
    assert status == 200 and reward == {"reward": created["kudos"]}
    _, done = horde(network.url, "GET", f"/generate/status/{created['id']}", alice)
    assert done["done"] is True and done["generations"][0]["worker_name"] == "bridge-1"
    # cancel: done, and the kudos back
    _, before = horde(network.url, "GET", "/find_user", alice)
    status, created = horde(network.url, "POST", "/generate/async", alice, ask)
    status, cancelled = horde(network.url, "DELETE", f"/generate/status/{created['id']}", alice)
    assert status == 200 and cancelled["done"] is True and cancelled["generations"] == []
    _, after = horde(network.url, "GET", "/find_user", alice)
    assert after["kudos"] == before["kudos"]
