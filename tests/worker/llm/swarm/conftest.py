"""Real swarms on loopback: a coordinator process and `idlegrid worker blocks` processes.

One `Cluster` per test module starts its processes in parallel where it can (a server
process spends most of its ~4 s start importing torch) and stops them all at the end.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from client.sdk import Client
from tests.procs import Proc

READY = re.compile(
    r"idlegrid block server (\S+) serving blocks (\d+):(\d+) of (\S+) at (/\S+/p2p/(\S+))"
)


@dataclass
class Server:
    name: str
    proc: Proc
    start: int = -1
    end: int = -1
    model: str = ""
    maddr: str = ""
    peer_id: str = ""

    def ready(self, timeout: float = 120) -> Server:
        match = self.proc.wait_for(READY.pattern, timeout)
        self.start, self.end = int(match.group(2)), int(match.group(3))
        self.model, self.maddr, self.peer_id = match.group(4), match.group(5), match.group(6)
        return self

    @property
    def alive(self) -> bool:
        return self.proc.popen.poll() is None


class Cluster:
    def __init__(self, tmp: Path, models: Path) -> None:
        self.tmp = tmp
        self.models = models
        self.procs: list[Proc] = []
        coordinator = self._start(
            "coordinator", ["coordinator", "--port", "0", "--data-dir", str(tmp / "data")]
        )
        try:
            self.url = coordinator.wait_for(r"listening on (http://\S+)", 60).group(1)
            with Client(self.url) as grid:
                self.api_key = grid.register("donor").api_key
        except BaseException:
            self.close()  # no process outlives a failed set-up
            raise

    def _start(self, label: str, args: list[str]) -> Proc:
        proc = Proc(args, self.tmp / f"{label}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def server(self, name: str, *flags: str, model: str = "llm") -> Server:
        """Start a block server (without waiting: call `.ready()`)."""
        args = [
            "worker",
            "blocks",
            "--model",
            str(self.models / model),
            "--coordinator",
            self.url,
            "--api-key",
            self.api_key,
            "--name",
            name,
            "--identity",
            str(self.tmp / f"{name}.key"),
            "--threads",
            "1",
            *flags,
        ]
        return Server(name, self._start(name, args))

    def gateway(self, name: str, peer: Server, *flags: str, model: str = "llm") -> Proc:
        """Start a text gateway (without waiting: wait for its `ready` line)."""
        args = [
            "worker",
            "gateway",
            "--model",
            str(self.models / model),
            "--coordinator",
            self.url,
            "--api-key",
            self.api_key,
            "--initial-peers",
            peer.maddr,
            "--name",
            name,
            "--identity",
            str(self.tmp / f"{name}.key"),
            "--threads",
            "1",
            *flags,
        ]
        return self._start(name, args)

    def cli(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "client.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Cluster]:
    started = Cluster(tmp_path_factory.mktemp("swarm"), tiny_models)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture(scope="module")
def full_model(tiny_models: Path) -> LlamaForCausalLM:
    """The whole tiny LM, as the reference (one thread, like the servers)."""
    torch.set_num_threads(1)
    model: LlamaForCausalLM = LlamaForCausalLM.from_pretrained(tiny_models / "llm")
    model.eval()
    return model
