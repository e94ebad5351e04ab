"""AI Horde's clip_skip, tiling, karras, seed_variation and `lcm` through /api/v2: onto our
jobs, priced, and handed on to AI Horde's workers."""

from __future__ import annotations

from tests.conftest import LiveApp
from tests.coordinator.http.test_horde import Horde, request
from tests.fakes import CAPS, FakeWorker, register_accounts


async def test_v2_extras_become_the_jobs_params(live: LiveApp) -> None:
    alice_key, donor_key = await register_accounts(live.url, "alice", "donor")
    alice = Horde(live.url, alice_key)
    async with FakeWorker(live.url, "ours", donor_key) as worker:
        extras = {"karras": True, "clip_skip": 2, "tiling": True, "seed_variation": 3, "n": 2}
        body = {**request(**extras), "prompt": "a (red:1.2) cube ### blurry"}
        created = await alice.ok("POST", "/v2/generate/async", body, 202)
        job = await worker.link.pop(CAPS, wait=5)
        assert job is not None and job.id == created["id"]
        p = job.params
        # k_euler_a has no Karras name of its own: the flag rides along
        assert (p.sampler, p.karras, p.clip_skip, p.tiling) == ("Euler a", True, 2, True)
        assert p.seeds() == [11, 14]
        plain = await alice.ok("POST", "/v2/generate/async", request(n=2), 202)
        # the weighted group costs a kudo per image, as on AI Horde; the rest nothing
        assert created["kudos"] == plain["kudos"] + 2
        # absent (or null) fields keep the defaults
        nulls = {"clip_skip": None, "tiling": None, "seed_variation": None, "sampler_name": "lcm"}
        await alice.ok("POST", "/v2/generate/async", request(**nulls), 202)
        for _ in range(2):
            job = await worker.link.pop(CAPS, wait=5)
            assert job is not None
        p = job.params
        assert (p.sampler, p.karras, p.clip_skip, p.tiling, p.seed_variation) == (
            "LCM",
            False,
            1,
            False,
            1,
        )


async def test_an_ai_horde_worker_gets_the_extras_in_its_payload(live: LiveApp) -> None:
    alice_key, owner_key = await register_accounts(live.url, "alice", "bridge")
    alice, bridge = Horde(live.url, alice_key), Horde(live.url, owner_key)
    pop = {"name": "My Bridge", "models": ["tiny"], "max_pixels": 512 * 512, "amount": 1}
    wanted = await alice.ok(
        "POST", "/v2/generate/async", request(karras=True, clip_skip=2, tiling=True), 202
    )
    leased = await bridge.ok("POST", "/v2/generate/pop", pop)
    assert leased["id"] == wanted["id"]
    payload = leased["payload"]
    assert (payload["sampler_name"], payload["karras"]) == ("k_euler_a", True)
    assert (payload["clip_skip"], payload["tiling"]) == (2, True)
