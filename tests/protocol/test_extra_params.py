"""clip_skip, tiling, karras, seed_variation and LCM in ImageParams: bounds, dumps, the PNG
text, the price."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from protocol.cost import image_cost, prompt_weights
from protocol.horde import horde_sampler
from protocol.infotext import parameters_text
from protocol.params import ImageParams
from protocol.signing import params_hash

PLAIN = {"prompt": "a cat", "width": 512, "height": 512, "steps": 20, "seed": 7}


def test_defaults_leave_dumps_and_hashes_as_they_were() -> None:
    plain = ImageParams.model_validate(PLAIN)
    explicit = ImageParams.model_validate(
        {**PLAIN, "clip_skip": 1, "tiling": False, "karras": False, "seed_variation": 1}
    )
    assert plain.model_dump(mode="json") == explicit.model_dump(mode="json")
    assert "clip_skip" not in plain.model_dump(mode="json")
    assert params_hash(plain) == params_hash(explicit)
    extra = ImageParams.model_validate({**PLAIN, "clip_skip": 2, "tiling": True})
    assert extra.model_dump(mode="json")["clip_skip"] == 2
    assert params_hash(extra) != params_hash(plain)
    # a job's params travel as JSON (spot checks re-run them): the extras survive it
    assert ImageParams.model_validate_json(extra.model_dump_json()) == extra


def test_seed_variation_steps_the_seeds() -> None:
    params = ImageParams.model_validate({**PLAIN, "n": 3, "seed_variation": 1000})
    assert params.seeds() == [7, 1007, 2007]
    assert ImageParams.model_validate({**PLAIN, "n": 3}).seeds() == [7, 8, 9]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"clip_skip": 0}, "clip_skip"),
        ({"clip_skip": 13}, "clip_skip"),
        ({"seed_variation": 0}, "seed_variation"),
        ({"seed_variation": 1001}, "seed_variation"),
        ({"sampler": "DDIM", "karras": True}, "karras"),
        ({"sampler": "PLMS", "karras": True}, "karras"),
        ({"sampler": "LCM", "karras": True}, "karras"),
    ],
)
def test_bounds_name_the_field(fields: dict[str, object], named: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ImageParams.model_validate({**PLAIN, **fields})
    assert refused.value.errors()[0]["loc"] == (named,)


def test_lcm_is_a_sampler_ai_horde_names() -> None:
    ImageParams.model_validate({**PLAIN, "sampler": "LCM"})
    assert horde_sampler("LCM") == ("lcm", False)


def test_png_text_uses_a1111s_keys() -> None:
    params = ImageParams.model_validate(
        {**PLAIN, "clip_skip": 2, "tiling": True, "karras": True, "sampler": "Euler"}
    )
    text = parameters_text(params, 7, "sd")
    assert "Sampler: Euler, Schedule type: Karras, CFG scale: 7" in text
    assert text.endswith("Model: sd, Clip skip: 2, Tiling: True")
    plain = parameters_text(ImageParams.model_validate(PLAIN), 7, "sd")
    assert "Clip skip" not in plain and "Tiling" not in plain and "Schedule" not in plain


@pytest.mark.parametrize(
    ("prompt", "weights"),
    [
        ("a cat", 0),
        ("a (cat:1.2)", 1),
        ("((cat)) and (dog)", 2),  # nested groups count once, as AI Horde counts them
        ("a \\(cat\\)", 0),
        ("a cat)", 0),
        ("[cat] [dog:cow:5]", 0),
    ],
)
def test_prompt_weights_are_counted_as_ai_horde_counts(prompt: str, weights: int) -> None:
    assert prompt_weights(prompt) == weights


def test_weights_cost_a_kudo_each_per_image_and_the_rest_nothing() -> None:
    base = image_cost(ImageParams.model_validate(PLAIN))
    assert base == 10
    free = {"clip_skip": 3, "tiling": True, "karras": True, "seed_variation": 9}
    assert image_cost(ImageParams.model_validate({**PLAIN, **free})) == base
    weighted = {**PLAIN, "prompt": "a (cat:1.2)", "negative_prompt": "(dog)", "n": 2}
    assert image_cost(ImageParams.model_validate(weighted)) == 2 * base + 2 * 2


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_weight_that_is_not_a_number_is_refused_at_the_boundary(field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ImageParams.model_validate({**PLAIN, field: "a (cat:1.2.3) and (dog:1.5)"})
    error = refused.value.errors()[0]
    assert error["loc"] == (field,) and "'1.2.3' is not a number" in error["msg"]
    ImageParams.model_validate({**PLAIN, field: "a (cat:1.2) [dog:cow:.5] (x: 2 )"})
