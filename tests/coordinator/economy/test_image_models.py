"""The image model reference in `--models FILE`: parsed next to the text models (whose
format is unchanged), every mistake named by its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.economy.image_models import catalog_fields
from coordinator.network_flags import NetworkSettings, network_config
from protocol.text import BUILTIN_TEXT_MODELS

SHA = "ab" * 32
TEXT = """
default = "smollm2"

[[models]]
name = "smollm2"
parameters = 134515008
blocks = 30
context = 8192
"""
IMAGE = f"""
[[image_models]]
name = "Tiny XL"
baseline = "sdxl"
sha256 = "{SHA.upper()}"
default_size = [1024, 768]
max_pixels = 1048576
max_steps = 60
nsfw = true
trigger = ["tiny style", "xl"]
"""


def test_a_file_lists_text_and_image_models() -> None:
    fields = catalog_fields(TEXT + IMAGE)
    assert [m.name for m in fields["text_models"]] == ["smollm2"]
    assert fields["default_text_model"] == "smollm2"
    (model,) = fields["image_models"]
    assert model.model_dump() == {
        "name": "Tiny XL",
        "baseline": "sdxl",
        "sha256": SHA,  # (any case in the file)
        "default_width": 1024,
        "default_height": 768,
        "max_pixels": 1048576,
        "max_steps": 60,
        "nsfw": True,
        "trigger": ("tiny style", "xl"),
    }


def test_the_text_only_format_is_unchanged_and_an_image_only_file_keeps_built_in_text() -> None:
    fields = catalog_fields(TEXT)
    assert fields["image_models"] == () and fields["default_text_model"] == "smollm2"
    image_only = catalog_fields(IMAGE)
    assert "text_models" not in image_only  # the built-in ones stay
    config = CoordinatorConfig(data_dir=Path("."), **image_only)
    assert config.text_models == BUILTIN_TEXT_MODELS and len(config.image_models) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('baseline = "sdxl"', 'baseline = "sd3"'), r"image_models\[0\]\.baseline: 'sd3'"),
        ((f'sha256 = "{SHA.upper()}"', 'sha256 = "abc"'), r"image_models\[0\]\.sha256: 'abc'"),
        ((f'sha256 = "{SHA.upper()}"\n', ""), r"image_models\[0\]\.sha256: missing"),
        (("[1024, 768]", "[1024]"), r"image_models\[0\]\.default_size: \[1024\]"),
        (("[1024, 768]", "[1020, 768]"), r"image_models\[0\]\.default_size: \[1020, 768\]"),
        (("[1024, 768]", "[2048, 2048]"), r"default_size: 2048x2048 is over max_pixels"),
        (("max_steps = 60", "max_steps = 0"), r"image_models\[0\]\.max_steps: 0"),
        (("nsfw = true", 'nsfw = "yes"'), r"image_models\[0\]\.nsfw: 'yes'"),
        (('trigger = ["tiny style", "xl"]', 'trigger = "xl"'), r"image_models\[0\]\.trigger"),
        (("nsfw = true", "vae = 1"), r"image_models\[0\]\.vae: unknown key"),
    ],
)
def test_a_mistake_is_named_by_its_key(change: tuple[str, str], message: str) -> None:
    text = (TEXT + IMAGE).replace(*change)
    assert text != TEXT + IMAGE
    with pytest.raises(ValueError, match=message):
        catalog_fields(text)


def test_a_name_listed_twice_and_unknown_tables_are_refused() -> None:
    with pytest.raises(ValueError, match=r"image_models\[1\]\.name: 'Tiny XL' is listed twice"):
        catalog_fields(TEXT + IMAGE + IMAGE)
    with pytest.raises(ValueError, match=r"loras: unknown key"):
        catalog_fields(TEXT + "[[loras]]\nname = 'x'\n")
    with pytest.raises(ValueError, match=r"image_models: write one"):
        catalog_fields(TEXT.replace('default = "smollm2"', 'image_models = "x"'))


def test_the_flag_and_file_reach_the_config(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(TEXT + IMAGE)
    fields = network_config(NetworkSettings(models=path))
    assert fields["allow_uncatalogued_models"] is None  # auto: only without a reference
    assert [m.name for m in fields["image_models"]] == ["Tiny XL"]
    fields = network_config(NetworkSettings(allow_uncatalogued_models="yes"))
    assert fields["allow_uncatalogued_models"] is True and "image_models" not in fields
    path.write_text(IMAGE.replace("max_steps = 60", "max_steps = -1"))
    with pytest.raises(SystemExit, match=r"--models .*image_models\[0\]\.max_steps: -1"):
        network_config(NetworkSettings(models=path))
