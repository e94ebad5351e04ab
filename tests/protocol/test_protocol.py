"""Validation messages, cost formula, canonical signing and the PNG parameters text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.cost import image_cost
from protocol.errors import SignatureInvalid, ValidationFailed
from protocol.infotext import parameters_text
from protocol.messages import PopRequest
from protocol.params import ImageParams
from protocol.samplers import SAMPLERS
from protocol.signing import (
    Identity,
    canonical_json,
    params_hash,
    result_message,
    verify,
)
from protocol.validation import parse


def test_defaults_and_seeds() -> None:
    params = ImageParams(prompt="cat", seed=5, n=3)
    assert (params.width, params.height, params.steps, params.sampler) == (512, 512, 20, "Euler a")
    assert params.seeds() == [5, 6, 7]
    with pytest.raises(ValueError, match="seed is not set"):
        ImageParams(prompt="cat").seeds()


@pytest.mark.parametrize(
    ("fields", "field", "fix"),
    [
        ({"width": 513}, "width", "use 512 or 520"),
        ({"height": 32}, "height", "greater than or equal to 64"),
        ({"sampler": "euler"}, "sampler", "choose one of: Euler, Euler a"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"steps": 2.5}, "steps", "valid integer"),
        ({"prompt": None}, "prompt", "valid string"),
        ({"extra": True}, "extra", "unknown field"),
    ],
)
def test_every_problem_names_its_field_and_fix(
    fields: dict[str, object], field: str, fix: str
) -> None:
    with pytest.raises(ValidationFailed) as failure:
        parse(ImageParams, {"prompt": "cat", **fields})
    problems = dict(failure.value.problems)
    assert fix in problems[field]
    assert failure.value.field == field


def test_all_a1111_samplers_the_issue_names_are_known() -> None:
    for name in (
        "Euler",
        "Euler a",
        "DPM++ 2M",
        "DPM++ 2M Karras",
        "DPM++ SDE Karras",
        "DDIM",
        "LMS",
        "Heun",
        "UniPC",
    ):
        assert name in SAMPLERS


def test_cost_scales_with_pixels_steps_sampler_and_n() -> None:
    base = ImageParams(prompt="x", width=512, height=512, steps=20)
    assert image_cost(base) == 10
    assert image_cost(base.model_copy(update={"steps": 40})) == 20
    assert image_cost(base.model_copy(update={"width": 1024})) == 20
    assert image_cost(base.model_copy(update={"sampler": "Heun"})) == 20  # second order
    assert image_cost(base.model_copy(update={"n": 3})) == 30
    assert image_cost(ImageParams(prompt="x", width=64, height=64, steps=1)) == 1


@given(
    w=st.integers(8, 256).map(lambda v: v * 8),
    h=st.integers(8, 256).map(lambda v: v * 8),
    steps=st.integers(1, 150),
    n=st.integers(1, 10),
    sampler=st.sampled_from(sorted(SAMPLERS)),
)
def test_cost_is_positive_and_monotonic(w: int, h: int, steps: int, n: int, sampler: str) -> None:
    params = ImageParams(prompt="x", width=w, height=h, steps=steps, n=n, sampler=sampler)
    cost = image_cost(params)
    assert cost >= 1
    if steps < 150:
        assert image_cost(params.model_copy(update={"steps": steps + 1})) >= cost


def test_canonical_json_is_sorted_and_compact() -> None:
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()


def test_signatures_verify_and_detect_tampering() -> None:
    identity = Identity.generate()
    params = ImageParams(prompt="cat", seed=1)
    message = result_message("job-1", params_hash(params), "ab" * 32)
    signature = identity.sign(message)
    verify(identity.public_key, message, signature)
    with pytest.raises(SignatureInvalid):
        verify(
            identity.public_key, result_message("job-2", params_hash(params), "ab" * 32), signature
        )
    with pytest.raises(SignatureInvalid):
        verify(Identity.generate().public_key, message, signature)
    with pytest.raises(SignatureInvalid):
        verify(identity.public_key, message, "zz")
    again = Identity.from_private_bytes(identity.private_bytes())
    assert again.public_key == identity.public_key


def test_params_hash_changes_with_any_parameter() -> None:
    params = ImageParams(prompt="cat", seed=1)
    assert params_hash(params) == params_hash(ImageParams(prompt="cat", seed=1))
    assert params_hash(params) != params_hash(params.model_copy(update={"seed": 2}))


def test_parameters_text_matches_automatic1111() -> None:
    params = ImageParams(
        prompt="a cat",
        negative_prompt="blurry",
        steps=4,
        cfg_scale=7.5,
        width=64,
        height=64,
        sampler="DPM++ 2M Karras",
    )
    assert parameters_text(params, 42, "tiny") == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 4, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: tiny"
    )
    plain = ImageParams(prompt="a cat", steps=4, cfg_scale=7.0)
    assert "Negative prompt" not in parameters_text(plain, 1, "m")
    assert "CFG scale: 7," in parameters_text(plain, 1, "m")


def test_pop_request_limits() -> None:
    with pytest.raises(ValidationFailed) as failure:
        parse(PopRequest, {"models": [], "max_pixels": 4096, "max_steps": 10})
    assert failure.value.field == "models"
