"""Statements built once and executed many times with bound parameters.

Building a SQLAlchemy statement and computing its cache key costs more than SQLite takes to
run it (the queue's statements are indexed lookups of microseconds). A statement object
built once keeps its cache key (SQLAlchemy memoizes it), so executing it again with new
parameters (`conn.execute(statement, {"name": value})`) skips straight to the compiled
form. The hot paths therefore keep their statements at module level, with `bindparam`s for
what varies; statements whose shape depends on a request (a worker's models, its filter)
are kept in a `Shapes` memo by that shape.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Shapes"]

V = TypeVar("V")


class Shapes(Generic[V]):
    """The most recently used `size` built values (statements) by shape; the least
    recently used is dropped when a new shape comes, so any number of shapes is safe."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._built: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, shape: Hashable, build: Callable[[], V]) -> V:
        found = self._built.get(shape)
        if found is not None:
            self._built.move_to_end(shape)
            return found
        value = build()
        self._built[shape] = value
        if len(self._built) > self._size:
            self._built.popitem(last=False)
        return value
