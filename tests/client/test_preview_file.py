"""`idlegrid generate --preview FILE`: each preview replaces FILE whole, in FILE's format;
one that cannot be read is skipped, never the end of the wait."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from client.preview_file import PreviewFile
from protocol.preview import JobPreview


def _preview(colour: tuple[int, int, int], data: bytes | None = None) -> JobPreview:
    if data is None:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
        data = buffer.getvalue()
    text = base64.b64encode(data).decode()
    return JobPreview(image=0, step=5, steps=20, content_type="image/jpeg", data=text)


def test_each_preview_replaces_the_file_in_its_suffix_format(tmp_path: Path) -> None:
    as_sent = PreviewFile(tmp_path / "latest.jpg")
    as_sent(_preview((200, 0, 0)))
    assert (tmp_path / "latest.jpg").read_bytes() == base64.b64decode(_preview((200, 0, 0)).data)
    target = tmp_path / "new" / "latest.png"
    converted = PreviewFile(target)
    converted(_preview((200, 0, 0)))
    converted(_preview((0, 0, 200)))
    with Image.open(target) as image:
        assert image.format == "PNG"
        red, _, blue = image.convert("RGB").getpixel((4, 4))  # type: ignore[misc]
        assert blue > 150 and red < 60  # the latest
    assert converted.written == 2
    assert [p.name for p in target.parent.iterdir()] == ["latest.png"]  # no temporary left


def test_an_unreadable_preview_is_skipped(tmp_path: Path) -> None:
    target = tmp_path / "latest.webp"
    keeper = PreviewFile(target)
    keeper(_preview((0, 200, 0)))
    before = target.read_bytes()
    keeper(_preview((0, 0, 0), data=b"\xff\xd8\xff" + bytes(16)))
    assert target.read_bytes() == before and keeper.written == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.webp"]
