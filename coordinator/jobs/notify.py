"""Job-change notifications between coordinator processes: PostgreSQL LISTEN/NOTIFY.

`NotifyBridge` becomes the `publisher` of a `coordinator.jobs.signals.Signals`: every local
change is queued and sent by a background task as `NOTIFY <channel>, '<token>|<topic>|<payload>'`
(the caller never waits on the database). The bridge `LISTEN`s on the same channel on its own
asyncpg connection and hands the changes of other processes (any token but its own) to
`Signals.deliver`, which wakes this process's waiters.

Notifications are a speed-up, not the truth: waiters re-read the database after waking and
wake every `poll_fallback` seconds anyway, so a notification lost while the connection is
down only delays. The bridge reconnects with backoff and logs once per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from coordinator.jobs.signals import Signals

__all__ = ["NotifyBridge", "asyncpg_dsn"]

log = logging.getLogger(__name__)

# notifications queued while the connection is down; the oldest are dropped beyond this
MAX_PENDING = 10_000
# PostgreSQL refuses payloads of 8000 bytes or more
MAX_PAYLOAD = 7900
# idle connections are checked this often (a silently dead peer is found by the check)
KEEPALIVE = 30.0
# reconnect backoff, seconds
BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0
# most notifications sent in one round trip
BATCH = 500


def _set(event: asyncio.Event, *_args: object) -> None:
    event.set()


def asyncpg_dsn(database_url: str) -> str:
    """A plain asyncpg DSN from a SQLAlchemy URL (postgresql+asyncpg://... -> postgresql://...)."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"LISTEN/NOTIFY needs PostgreSQL, not {url.get_backend_name()}")
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class NotifyBridge:
    """Carries `Signals` changes between processes; `start` once, `stop` on shutdown."""

    def __init__(self, signals: Signals, database_url: str, channel: str = "idlegrid") -> None:
        self._signals = signals
        self._dsn = asyncpg_dsn(database_url)
        self._channel = channel
        # tells our own notifications (which LISTEN also delivers) from the others'
        self.token = secrets.token_hex(8)
        self._pending: list[str] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._connected = asyncio.Event()
        self._stopping = False
        # notifications received from other processes (for tests and diagnostics)
        self.received = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self, connect_wait: float = 10.0) -> None:
        """Start the bridge; waits up to `connect_wait` seconds for the first connection (then
        keeps trying in the background: the coordinator works without it, only slower)."""
        self._signals.publisher = self._publish
        self._task = asyncio.create_task(self._run(), name="notify-bridge")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(connect_wait):
                await self._connected.wait()

    async def stop(self, flush_timeout: float = 1.0) -> None:
        """Stop publishing; send what is queued (briefly), close the connection."""
        if self._signals.publisher == self._publish:
            self._signals.publisher = None
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            # the task sends what is queued and returns, if connected; else it is cancelled
            if self.connected:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(flush_timeout):
                        await asyncio.shield(self._task)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # --- sending ------------------------------------------------------------------------

    def _publish(self, topic: str, payload: str) -> None:
        message = f"{self.token}|{topic}|{payload}"
        if len(message.encode()) > MAX_PAYLOAD:
            log.debug("notification too long to send (%d bytes); waiters will poll", len(message))
            return
        self._pending.append(message)
        if len(self._pending) > MAX_PENDING:
            del self._pending[: len(self._pending) - MAX_PENDING]
        self._wake.set()

    async def _send(self, conn: Any) -> None:
        while self._pending:
            batch = self._pending[:BATCH]
            # asyncpg pipelines executemany: one round trip for the batch
            await conn.executemany(
                "SELECT pg_notify($1, $2)", [(self._channel, message) for message in batch]
            )
            del self._pending[: len(batch)]

    # --- receiving ----------------------------------------------------------------------

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, message: str) -> None:
        token, _, rest = message.partition("|")
        if token == self.token:
            return
        topic, sep, payload = rest.partition("|")
        if not sep:
            log.debug("ignoring a malformed notification %r", message)
            return
        self.received += 1
        self._signals.deliver(topic, payload)

    # --- the connection -----------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        outage = False
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set, lost))
                await conn.add_listener(self._channel, self._on_notification)
                self._conn = conn
                self._connected.set()
                if outage:
                    log.info("LISTEN/NOTIFY connection to PostgreSQL is back")
                outage, backoff = False, BACKOFF_MIN
                await self._serve(conn, lost)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not outage:
                    log.warning(
                        "LISTEN/NOTIFY connection to PostgreSQL lost or refused (%s); "
                        "retrying; meanwhile other processes' changes arrive by polling",
                        exc,
                    )
                    outage = True
            finally:
                self._connected.clear()
                self._conn = None
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _serve(self, conn: Any, lost: asyncio.Event) -> None:
        """Send queued notifications until stopped, or the connection is lost (then raise)."""
        while True:
            await self._send(conn)
            self._wake.clear()
            if self._stopping:
                return
            if self._pending:
                continue
            wake = asyncio.create_task(self._wake.wait())
            gone = asyncio.create_task(lost.wait())
            try:
                await asyncio.wait(
                    {wake, gone}, timeout=KEEPALIVE, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                wake.cancel()
                gone.cancel()
            if lost.is_set() or conn.is_closed():
                raise ConnectionError("the connection was closed")
            if not self._wake.is_set():
                async with asyncio.timeout(10):
                    await conn.execute("SELECT 1")
