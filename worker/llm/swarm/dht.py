"""Starting and stopping a hivemind DHT process (and its p2pd daemon) from asyncio.

Block servers and swarm clients both join the swarm through `start_dht` and leave it with
`stop_dht`, which makes sure no process is left behind. A block server gives the daemon its
own libp2p key (`worker.llm.swarm.peer_proof.PeerKey`), which vouches for the key that signs
its DHT records (see `worker.llm.swarm.records`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from hivemind import DHT
from hivemind.dht.crypto import RSASignatureValidator

__all__ = ["start_dht", "stop_dht"]

log = logging.getLogger(__name__)


async def start_dht(
    *,
    initial_peers: tuple[str, ...],
    host_maddrs: tuple[str, ...],
    announce_maddrs: tuple[str, ...] = (),
    nat_port_map: bool = False,
    client_mode: bool,
    validator: RSASignatureValidator,
    startup_timeout: float = 60.0,
    identity_path: Path | None = None,
) -> DHT:
    """Start a hivemind DHT process (and its p2pd) without blocking the event loop.

    Stop it with `stop_dht`.
    """
    kwargs: dict[str, Any] = {}
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    if identity_path is not None:
        # p2pd's libp2p key (worker.llm.swarm.peer_proof); hivemind's "is it taken?" probe
        # reads only RSA identities, and a fresh key is not taken
        kwargs.update(identity_path=str(identity_path), check_if_identity_free=False)
    dht = DHT(
        initial_peers=list(initial_peers) or None,
        start=False,
        host_maddrs=list(host_maddrs),
        nat_port_map=nat_port_map,
        client_mode=client_mode,
        record_validators=[validator],
        **kwargs,
    )
    _fork_with_default_sigterm(dht)
    began = time.monotonic()
    try:
        await asyncio.to_thread(dht.wait_until_ready, startup_timeout)
    except BaseException:
        await stop_dht(dht)
        raise
    log.debug("DHT ready in %.2fs", time.monotonic() - began)
    return dht


def _fork_with_default_sigterm(dht: DHT) -> None:
    """Start the DHT process with SIGTERM's default action.

    The DHT process is forked, so it would inherit a handler installed with
    `loop.add_signal_handler`, which there only pokes the parent's event loop: SIGTERM
    could no longer stop it, and `DHT.shutdown`'s fallback (terminate) would leave it
    running, and the parent hanging at exit while it joins its children.
    """
    previous = signal.getsignal(signal.SIGTERM)
    swap = previous not in (signal.SIG_DFL, None) and (
        threading.current_thread() is threading.main_thread()
    )
    if swap:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        dht.start()
    finally:
        if swap:
            signal.signal(signal.SIGTERM, previous)


async def stop_dht(dht: DHT, grace: float = 3.0) -> None:
    """Shut down a DHT process and make sure that it and its p2pd daemon are gone."""
    try:
        leftovers = psutil.Process(dht.pid).children(recursive=True) if dht.pid else []
    except psutil.Error:
        leftovers = []
    await asyncio.to_thread(dht.shutdown)
    await asyncio.to_thread(_reap, dht, leftovers, grace)


def _reap(dht: DHT, daemons: list[psutil.Process], grace: float) -> None:
    if dht.pid is not None:
        dht.join(grace)
        if dht.is_alive():
            log.warning("the DHT process did not stop; killing it")
            dht.kill()
            dht.join(grace)
    running = [p for p in daemons if _running(p)]
    for process in running:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    deadline = time.monotonic() + grace
    while running and time.monotonic() < deadline:
        time.sleep(0.05)
        running = [p for p in running if _running(p)]
    for process in running:
        log.warning("killing %s (pid %d), left behind by the DHT", process.name(), process.pid)
        with contextlib.suppress(psutil.Error):
            process.kill()


def _running(process: psutil.Process) -> bool:
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
