"""AI Horde's post-processor names, the hires fix's first-pass size and the PNG text."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol.infotext import parameters_text
from protocol.params import ImageParams, sampled_steps
from protocol.postprocess import check_post_processing, first_pass_size, ordered


@pytest.mark.parametrize(
    ("size", "native", "first"),
    [
        ((1024, 1024), 512, (512, 512)),
        ((768, 1024), 512, (512, 640)),  # 512 x 682.7, rounded down to 64s
        ((1024, 576), 512, (896, 512)),  # 910.2 x 512
        ((512, 1024), 512, (512, 1024)),  # not larger on both sides: no first pass
        ((128, 96), 64, (80, 64)),
    ],
)
def test_first_pass_size_follows_ai_horde(
    size: tuple[int, int], native: int, first: tuple[int, int]
) -> None:
    assert first_pass_size(*size, native) == first


def test_post_processing_names() -> None:
    assert check_post_processing(["GFPGAN", "4x_AnimeSharp"]) is None
    assert "S-Lab" in (check_post_processing(["CodeFormers"]) or "")
    assert "unknown post-processor 'x'" in (check_post_processing(["x"]) or "")
    assert "twice" in (check_post_processing(["GFPGAN", "GFPGAN"]) or "")
    assert "at most one" in (check_post_processing(["NMKD_Siax", "RealESRGAN_x2plus"]) or "")
    assert ordered(["NMKD_Siax", "GFPGAN"]) == ["GFPGAN", "NMKD_Siax"]


def test_extras_are_left_out_of_dumps_when_off() -> None:
    # so the params of a job without extras hash and sign as before
    assert (
        ImageParams(prompt="x").model_dump().keys()
        == ImageParams(prompt="x", hires_fix=False, post_processing=[]).model_dump().keys()
    )
    assert "hires_fix" not in ImageParams(prompt="x").model_dump()
    assert ImageParams(prompt="x", hires_fix=True).model_dump()["hires_fix"] is True


def test_hires_fix_rules_and_steps() -> None:
    params = ImageParams(prompt="x", steps=10, hires_fix=True, hires_fix_denoising_strength=0.35)
    assert sampled_steps(params) == 13
    with pytest.raises(ValidationError, match="runs no second-pass step"):
        ImageParams(prompt="x", steps=2, hires_fix=True, hires_fix_denoising_strength=0.3)
    with pytest.raises(ValidationError, match="cannot be used with 'img2img'"):
        ImageParams(prompt="x", source_processing="img2img", hires_fix=True)


def test_parameters_text_records_the_extras() -> None:
    params = ImageParams(
        prompt="a cat",
        width=1024,
        height=768,
        steps=10,
        seed=5,
        hires_fix=True,
        hires_fix_denoising_strength=0.5,
        post_processing=["RealESRGAN_x2plus", "GFPGAN"],
        facefixer_strength=0.25,
    )
    text = parameters_text(params, 5, "m", first_pass=(640, 512))
    assert text.splitlines()[1] == (
        "Steps: 10, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 640x512, Model: m, "
        "Denoising strength: 0.5, Hires upscale: 1.6, Hires resize: 1024x768, Hires steps: 10, "
        'Hires upscaler: Latent, Postprocessing: "GFPGAN, RealESRGAN_x2plus", '
        "Face restoration strength: 0.25"
    )


def test_a_returned_control_map_is_not_post_processed() -> None:
    control = {
        "prompt": "p",
        "source_processing": "img2img",
        "control_type": "canny",
        "return_control_map": True,
    }
    assert ImageParams.model_validate(control).return_control_map
    with pytest.raises(ValidationError, match="return_control_map returns the control map") as err:
        ImageParams.model_validate({**control, "post_processing": ["RealESRGAN_x2plus"]})
    assert err.value.errors()[0]["loc"] == ("return_control_map",)
