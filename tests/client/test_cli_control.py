"""`idlegrid generate --control ...` (issue 24): its flags checked before any network."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--control-image", "c.png"], "--control-image needs a control type: add --control"),
        (["--image-is-control"], "--image-is-control needs a control type"),
        (["--return-control-map"], "--return-control-map needs a control type"),
        (["--control", "canny"], "--control needs the image to guide by: add --control-image"),
        (["--control", "canny", "--control-image", "c.png", "--image", "s.png"], "give one"),
        (["--control", "canny", "--control-image", "c.png", "--mask", "m.png"], "takes no mask"),
        (["--control", "canny", "--control-image", "c.png", "--strength", "0.5"], "from noise"),
        (["--control", "canny", "--control-image", "/nonexistent/c.png"], "--control-image:"),
        (
            ["--control", "canny", "--control-image", __file__, "--image-is-control"],
            "is not a PNG, WebP or JPEG image",
        ),
    ],
)
def test_control_flags_are_checked_before_any_network(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # port 9 (discard) on loopback: nothing listens, and nothing must be sent anyway
    code = main(["generate", "a cat", "--coordinator", "http://127.0.0.1:9", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_an_unknown_control_type_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["generate", "a cat", "--control", "sketch", "--control-image", str(Path(__file__))])
    assert refused.value.code == 2
    assert "invalid choice: 'sketch'" in capsys.readouterr().err
