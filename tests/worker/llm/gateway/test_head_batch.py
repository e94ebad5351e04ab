"""BatchedHead: the next-token logits of chats running at once go through the LM head as one
batch and equal each chat's own (tiny model's head, real threads)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from worker.llm.gateway.head_batch import BatchedHead
from worker.llm.gateway.lm_head import LMHead


class GatedHead:
    """The real head, whose first `logits` call waits for `release` (so others queue)."""

    def __init__(self, head: LMHead) -> None:
        self.head = head
        self.release = threading.Event()
        self.calls: list[int] = []

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.head.eos_token_ids

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.embed(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls.append(hidden.shape[0])
        if len(self.calls) == 1:
            assert self.release.wait(30)
        return self.head.logits(hidden)


def _wait_for(condition: Callable[[], object], timeout: float = 30) -> None:
    """Poll (other threads, not an event loop, make it true) until `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_calls_that_wait_go_through_together_and_match_their_own(tiny_models: Path) -> None:
    head = LMHead.load(tiny_models / "llm")
    gated = GatedHead(head)
    batched = BatchedHead(gated)
    hiddens = [torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(n)) for n in range(5)]
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(batched.logits, hiddens[0])
        _wait_for(lambda: gated.calls)  # the first call holds the head
        rest = [pool.submit(batched.logits, hidden) for hidden in hiddens[1:]]
        _wait_for(lambda: batched.waiting == 4)
        gated.release.set()
        got = [first.result(30), *(future.result(30) for future in rest)]
    assert gated.calls == [1, 4]
    assert batched.batch_sizes == [1, 4]
    for hidden, logits in zip(hiddens, got, strict=True):
        torch.testing.assert_close(logits, head.logits(hidden), rtol=1e-5, atol=1e-5)
    # several positions (a prompt) run alone, unbatched
    prompt = torch.randn(1, 3, 64)
    torch.testing.assert_close(batched.logits(prompt), head.logits(prompt))


def test_a_failing_batch_fails_each_of_its_calls(tiny_models: Path) -> None:
    batched = BatchedHead(LMHead.load(tiny_models / "llm"))
    with pytest.raises(RuntimeError):
        batched.logits(torch.randn(1, 1, 7))  # the wrong hidden size
    assert batched.waiting == 0
    assert batched.logits(torch.randn(1, 1, 64)).shape[:2] == (1, 1)
