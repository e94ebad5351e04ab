"""A submit whose answer is cut off (the coordinator restarted, a proxy dropped the
connection) is retried by the SDK with the same Idempotency-Key: one job, one charge."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from client.sdk import AsyncClient
from protocol.params import ImageParams
from tests.conftest import LiveApp
from tests.fakes import register_accounts

SMALL = ImageParams(prompt="a red cube", width=64, height=64, steps=4, seed=11)


@contextlib.asynccontextmanager
async def _cutting_proxy(upstream: str, cuts: int) -> AsyncIterator[str]:
    """A TCP proxy to `upstream` that passes the first `cuts` requests on and then drops
    the connection as their answers begin; yields its URL."""
    host, port = urlsplit(upstream).hostname, urlsplit(upstream).port
    left = [cuts]

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if cut and left[0] > 0:
                    left[0] -= 1
                    writer.transport.abort()  # the coordinator acted; its answer is lost
                    return
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(host, port)
        async with asyncio.TaskGroup() as group:
            group.create_task(pipe(client_r, up_w, cut=False))
            group.create_task(pipe(up_r, client_w, cut=True))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def test_a_submit_cut_off_is_retried_without_a_second_charge(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "alice")
    async with _cutting_proxy(live.url, cuts=2) as url, AsyncClient(url, key) as alice:
        created = await alice.submit_image(SMALL)
    alice_account = await live.store.accounts.account_by_key(key)
    assert alice_account is not None
    jobs = await live.store.image_jobs.account_jobs(alice_account, 10, 0)
    assert [job.id for job in jobs] == [created.id]
    assert await live.store.ledger.balance(alice_account.id) == 100 - created.kudos_cost
