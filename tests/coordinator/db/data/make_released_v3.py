"""Regenerate released_v3.sql: a database written by the released coordinator (schema 3).

The dump must come from the released code itself, not from today's, so run this against
a copy of the release (reading the repository only):

    rm -rf /tmp/released && mkdir /tmp/released
    git archive <release commit> coordinator protocol | tar -x -C /tmp/released
    PYTHONPATH=/tmp/released .venv/bin/python tests/coordinator/db/data/make_released_v3.py

It opens a fresh SQLite file with the released Store (which runs the released
`schema.migrate` to version 3), drives it through its public methods (accounts, a worker,
image jobs that end queued, leased, done and cancelled, a transfer) and writes
sqlite3's `.iterdump()` next to this file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path

from coordinator.config import CoordinatorConfig
from coordinator.economy import transfer
from coordinator.store import ResultRecord, Store
from protocol.cost import image_cost
from protocol.params import ImageParams

OUT = Path(__file__).with_name("released_v3.sql")


def _params(seed: int) -> ImageParams:
    return ImageParams(prompt="a red cube", width=64, height=64, steps=4, seed=seed)


async def _fill(config: CoordinatorConfig) -> None:
    store = await Store.open(config)
    try:
        alice, _ = await store.create_account("alice")
        bob, _ = await store.create_account("bob")
        await store.create_account("carol")  # never spends: her balance is the grant
        anonymous = await store.anonymous_account()
        worker, _ = await store.register_worker("w1", "a" * 64, None)

        done = await store.create_image_job(alice, _params(1), image_cost(_params(1)))
        leased = await store.create_image_job(bob, _params(2), image_cost(_params(2)))
        popped = await store.pop_job(worker, ["any"], 64 * 64, 10)
        assert popped is not None and popped.id == done.id
        await store.complete_job(
            worker, popped, [ResultRecord(0, 1, "0" * 64, "0" * 128)]
        )  # untrusted: part of the pay is held on its pending account
        popped = await store.pop_job(worker, ["any"], 64 * 64, 10)
        assert popped is not None and popped.id == leased.id

        cancelled = await store.create_image_job(alice, _params(3), image_cost(_params(3)))
        await store.cancel_job(cancelled.id)
        for seed in (4, 5):
            await store.create_image_job(alice, _params(seed), image_cost(_params(seed)))
        await store.create_image_job(bob, _params(6), image_cost(_params(6)))
        await store.create_image_job(anonymous, _params(7), image_cost(_params(7)))
        await transfer(store, bob, "alice", 5, "transfer-1")
    finally:
        await store.aclose()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "released.db"
        config = CoordinatorConfig(
            data_dir=Path(tmp), database_url=f"sqlite+aiosqlite:///{path}", port=0
        )
        asyncio.run(_fill(config))
        db = sqlite3.connect(path)
        try:
            OUT.write_text("\n".join(db.iterdump()) + "\n")
        finally:
            db.close()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
