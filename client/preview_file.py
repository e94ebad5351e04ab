"""`idlegrid generate --preview FILE`: the job's latest live preview, kept in a file.

Each preview (protocol.preview.JobPreview) replaces the file atomically (written beside it,
then renamed over it), so an image viewer watching FILE never reads half a picture. The
picture is written as the coordinator sent it (a JPEG from our workers), or re-encoded when
FILE's suffix names another format (.png, .webp, .jpg).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import tempfile
from pathlib import Path

from PIL import Image

from protocol.preview import JobPreview, PreviewType

__all__ = ["PreviewFile"]

log = logging.getLogger(__name__)

_FORMATS: dict[str, tuple[str, PreviewType]] = {
    ".png": ("PNG", "image/png"),
    ".webp": ("WEBP", "image/webp"),
    ".jpg": ("JPEG", "image/jpeg"),
    ".jpeg": ("JPEG", "image/jpeg"),
}


class PreviewFile:
    """Call with each preview; `written` counts the pictures written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0

    def __call__(self, preview: JobPreview) -> None:
        try:
            data = self._encoded(preview)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # a preview is a courtesy: one that cannot be read never ends the wait
            log.warning("skipped a preview that cannot be read: %s", exc)
            return
        self._replace(data)

    def _encoded(self, preview: JobPreview) -> bytes:
        """The bytes to write: as sent, or re-encoded in the format FILE's suffix names."""
        data = base64.b64decode(preview.data, validate=True)
        wanted = _FORMATS.get(self.path.suffix.lower())
        if wanted is not None and wanted[1] != preview.content_type:
            with Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "WEBP"]) as image:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format=wanted[0])
                return buffer.getvalue()
        return data

    def _replace(self, data: bytes) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.written += 1
