"""Live previews of running image jobs, kept in memory only while someone watches.

A requester asks for them by opening the job's event stream with `?previews=true`
(coordinator.http.jobs); while such a stream is open, `wanted` tells the job's worker so
in each progress answer, and the worker attaches a small picture to its progress reports
(protocol.preview). The latest picture of each watched job is kept here and sent on the
streams as a `preview` event; it is dropped when the last such stream closes. Nothing is
written to the database or the file store: previews are not results, nobody pays for
them and spot checks never see them.

The state is this process's: with several coordinator processes, a preview reaches the
streams of the process that received the worker's report (README: Live previews).
"""

from __future__ import annotations

import io
import itertools
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image

from protocol.preview import PREVIEW_MAX_SIDE, JobPreview, PreviewType, decode_preview

__all__ = ["MAX_PREVIEW_JOBS", "Previews", "check_preview"]

# the most jobs whose latest preview is held at once (each at most PREVIEW_MAX_BYTES)
MAX_PREVIEW_JOBS = 512


def check_preview(text: str) -> PreviewType:
    """The type of the preview picture in `text` (base64); ValueError naming the problem
    when it is not a JPEG, PNG or WebP of at most PREVIEW_MAX_SIDE pixels a side. Only
    the header is read: the picture is never decoded here."""
    data, kind = decode_preview(text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"the preview picture cannot be read: {exc}") from None
    if max(width, height) > PREVIEW_MAX_SIDE:
        raise ValueError(
            f"the preview is {width}x{height} pixels; send at most {PREVIEW_MAX_SIDE} a side"
        )
    return kind


@dataclass(frozen=True)
class _Stored:
    # increases with every preview stored (in this process)
    number: int
    preview: JobPreview


class Previews:
    """The jobs watched with previews on, and the latest preview of each."""

    def __init__(self, max_jobs: int = MAX_PREVIEW_JOBS) -> None:
        self.max_jobs = max_jobs
        self._watchers: Counter[str] = Counter()
        self._latest: OrderedDict[str, _Stored] = OrderedDict()
        self._numbers = itertools.count(1)

    @contextmanager
    def watching(self, job_id: str) -> Iterator[None]:
        """A stream with previews on is open on `job_id` for as long as the block runs."""
        self._watchers[job_id] += 1
        try:
            yield
        finally:
            self._watchers[job_id] -= 1
            if self._watchers[job_id] <= 0:
                del self._watchers[job_id]
                self._latest.pop(job_id, None)

    def wanted(self, job_id: str) -> bool:
        """Whether a stream with previews on watches `job_id` (in this process)."""
        return self._watchers[job_id] > 0

    def put(self, job_id: str, preview: JobPreview) -> bool:
        """Keep `preview` as the job's latest if anyone watches it; True if kept."""
        if not self.wanted(job_id):
            return False
        self._latest[job_id] = _Stored(next(self._numbers), preview)
        self._latest.move_to_end(job_id)
        while len(self._latest) > self.max_jobs:
            self._latest.popitem(last=False)
        return True

    def latest(self, job_id: str, after: int = 0) -> tuple[int, JobPreview] | None:
        """The job's latest preview and its number, if it is newer than number `after`."""
        stored = self._latest.get(job_id)
        if stored is None or stored.number <= after:
            return None
        return stored.number, stored.preview

    @property
    def held(self) -> int:
        """Jobs whose latest preview is held."""
        return len(self._latest)
