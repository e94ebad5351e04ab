"""`idlegrid generate --preview FILE`: the job's latest live preview, kept in a file.

Each preview (protocol.preview.JobPreview) replaces the file atomically (written beside it,
then renamed over it), so an image viewer watching FILE never reads half a picture. The
picture is written as the coordinator sent it (a JPEG from our workers), or re-encoded when
FILE's suffix names another format (.png, .webp, .jpg).
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from protocol.preview import JobPreview, PreviewType

__all__ = ["PreviewFile"]

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
        data = base64.b64decode(preview.data)
        wanted = _FORMATS.get(self.path.suffix.lower())
        if wanted is not None and wanted[1] != preview.content_type:
            with Image.open(io.BytesIO(data)) as image:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format=wanted[0])
                data = buffer.getvalue()
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
