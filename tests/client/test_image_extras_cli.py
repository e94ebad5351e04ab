"""`idlegrid generate`'s flags for the hires fix, upscalers and face fixers."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from client.cli import UsageError, build_parser, main
from client.image_extras import extras_fields
from protocol.params import ImageParams


def _fields(*flags: str) -> dict[str, object]:
    args = build_parser().parse_args(["generate", "a cat", *flags])
    return extras_fields(args, UsageError)


def test_the_flags_become_the_ai_horde_fields() -> None:
    assert _fields() == {}
    fields = _fields(
        "--hires-fix",
        "--hires-strength",
        "0.3",
        "--upscale",
        "RealESRGAN_x2plus",
        "--face-fix",
        "GFPGAN",
        "--face-fix-strength",
        "0.4",
    )
    params = ImageParams.model_validate({"prompt": "a cat", **fields})
    assert params.hires_fix and params.hires_fix_denoising_strength == 0.3
    assert params.post_processing == ["GFPGAN", "RealESRGAN_x2plus"]
    assert params.facefixer_strength == 0.4
    assert params.output_size == (1024, 1024)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hires-strength", "0.5"], "--hires-strength goes with --hires-fix"),
        (["--face-fix-strength", "0.5"], "--face-fix-strength goes with --face-fix NAME"),
        (["--face-fix", "NMKD_Siax"], "NMKD_Siax is an upscaler: use --upscale"),
        (["--upscale", "GFPGAN"], "GFPGAN is a face fixer: use --face-fix"),
        (["--face-fix", "CodeFormers"], "S-Lab License"),
        (["--upscale", "RealESRGAN_x4plus", "--size", "1024x1024"], "4096x4096, over 2048"),
    ],
)
def test_bad_extras_are_refused_before_any_network(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", "a cat", "--coordinator", "http://127.0.0.1:9", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_hires_fix_is_for_txt2img_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "source.png"
    Image.new("RGB", (64, 64)).save(source)
    code = main(
        [
            "generate",
            "a cat",
            "--coordinator",
            "http://127.0.0.1:9",
            "--hires-fix",
            "--image",
            str(source),
        ]
    )
    assert code == 2
    assert "hires_fix: the hires fix makes a txt2img image" in capsys.readouterr().err
