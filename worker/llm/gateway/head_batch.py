"""The LM head shared by the chats a gateway serves at once: one matmul for all of them.

Each chat picks its next token on a worker thread (`generation.next_token`), and the head
(final norm, then a [vocab x hidden] matrix) is most of that work; one token's logits read
the whole matrix, so eight chats' tokens cost about what one costs when they go through
together. `BatchedHead.logits` does that without a window: a call that finds the head idle
runs at once with whatever is waiting, and the calls that arrive meanwhile go together in
the next run. A call of more than one position (a prompt's logprobs) runs alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from worker.llm.gateway.generation import TokenHead

__all__ = ["BatchedHead"]


@dataclass
class _Call:
    hidden: torch.Tensor
    done: bool = False
    logits: torch.Tensor | None = None
    error: BaseException | None = None


class BatchedHead:
    """A `TokenHead` over `head` whose single-position `logits` calls from concurrent
    threads run as one batch."""

    def __init__(self, head: TokenHead) -> None:
        self._head = head
        self._ready = threading.Condition()
        self._waiting: list[_Call] = []
        self._busy = False
        # calls per run of the head (tests and benchmarks read it)
        self.batch_sizes: list[int] = []

    @property
    def waiting(self) -> int:
        """Calls waiting for the head to be free."""
        with self._ready:
            return len(self._waiting)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._head.eos_token_ids

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._head.embed(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] != 1:
            return self._head.logits(hidden)
        call = _Call(hidden)
        with self._ready:
            self._waiting.append(call)
            while not call.done and self._busy:
                self._ready.wait()
            if call.done:
                return self._answer(call)
            # the head is idle: run everything waiting, this call included
            self._busy = True
            batch, self._waiting = self._waiting, []
        try:
            self.batch_sizes.append(len(batch))
            logits = self._head.logits(torch.cat([c.hidden for c in batch]))
            for row, waiting in enumerate(batch):
                waiting.logits = logits[row : row + 1]
        except BaseException as exc:
            for waiting in batch:
                waiting.error = exc
        finally:
            with self._ready:
                for waiting in batch:
                    waiting.done = True
                self._busy = False
                self._ready.notify_all()
        return self._answer(call)

    @staticmethod
    def _answer(call: _Call) -> torch.Tensor:
        if call.error is not None:
            raise call.error
        assert call.logits is not None
        return call.logits
