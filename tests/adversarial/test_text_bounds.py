"""Finding 7, text part: "a `max_tokens=4` job streamed 6 000 000 characters in 4 s and
kept its lease; each delta rewrites the whole text."

The attacker is a gateway on the real HTTP API that pops a `max_tokens=4` job and streams
megabytes of deltas. A job's text is capped at `max_tokens` x 128 characters (the longest
decoded token of the tokenizers we run is 81); deltas past the cap are refused and extend
nothing, and so is a result whose text is longer.
"""

from __future__ import annotations

import pytest

from client.sdk import AsyncClient
from protocol.signing import Identity
from protocol.text import TextModel, TextParams
from tests.conftest import LiveApp
from worker.common.link import CoordinatorLink
from worker.errors import CoordinatorRejected

# the sizes `idlegrid models tiny` builds into DIR/llm (the coordinator's built-in entry)
LLM = TextModel(name="llm", blocks=4, parameters=276_032, max_context=512)
CAP = 4 * 128  # characters a max_tokens=4 job may hold
PIECE = "x" * 60_000  # a delta just under the default 64 KiB body limit


async def test_a_gateway_cannot_stream_more_text_than_max_tokens_allow(live: LiveApp) -> None:
    attacker = CoordinatorLink(live.url, Identity.generate(), "mallory-gateway", None)
    try:
        await attacker.register()
        async with AsyncClient(live.url) as anon:
            assert await attacker.pop_text([LLM], wait=0) is None
            created = await anon.submit_text(TextParams(prompt="hi", max_tokens=4))
            job = await attacker.pop_text([LLM], wait=5)
            assert job is not None and job.id == created.id

            # megabytes of deltas: each one is refused, naming the cap
            sent = 0
            for _ in range(50):  # 3 MB
                with pytest.raises(CoordinatorRejected) as refused:
                    await attacker.text_delta(job.id, sent, PIECE)
                assert "512 characters" in str(refused.value)
            status = await anon.text_job(job.id)
            assert status.text == "" and status.state == "leased"

            # pieces under the cap are accepted up to it and not one character more
            for _ in range(5):
                sent = (await attacker.text_delta(job.id, sent, "y" * 100)).length
            assert sent == 500
            with pytest.raises(CoordinatorRejected, match="512 characters"):
                await attacker.text_delta(job.id, sent, "z" * 100)
            assert (await attacker.text_delta(job.id, sent, "z" * 12)).length == CAP
            with pytest.raises(CoordinatorRejected, match="512 characters"):
                await attacker.text_delta(job.id, CAP, "!")
            # a retry of text already sent stays harmless
            assert (await attacker.text_delta(job.id, 500, "z" * 12)).length == CAP
            assert len((await anon.text_job(job.id)).text) == CAP

            # the result obeys the same cap
            with pytest.raises(CoordinatorRejected, match="512 characters"):
                await attacker.submit_text(job, "w" * (CAP + 1), "length", 0, 1, [])
            await attacker.submit_text(job, "w" * CAP, "length", 0, 1, [])
            final = await anon.text_job(job.id)
        assert final.state == "done" and final.text == "w" * CAP
    finally:
        await attacker.aclose()


async def test_text_holding_nul_is_a_clear_400(live: LiveApp) -> None:
    """PostgreSQL text cannot hold NUL: such a delta or result must be refused up front,
    not reach the database (where it failed as "store unavailable")."""
    attacker = CoordinatorLink(live.url, Identity.generate(), "mallory-gateway", None)
    try:
        await attacker.register()
        async with AsyncClient(live.url) as anon:
            assert await attacker.pop_text([LLM], wait=0) is None
            await anon.submit_text(TextParams(prompt="hi", max_tokens=4))
            job = await attacker.pop_text([LLM], wait=5)
            assert job is not None
            with pytest.raises(CoordinatorRejected, match="NUL") as refused:
                await attacker.text_delta(job.id, 0, "a\x00b")
            assert refused.value.status == 400
            with pytest.raises(CoordinatorRejected, match="NUL"):
                await attacker.submit_text(job, "a\x00b", "length", 0, 1, [])
            assert (await anon.text_job(job.id)).state == "leased"
    finally:
        await attacker.aclose()
