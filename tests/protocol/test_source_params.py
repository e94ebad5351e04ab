"""`ImageParams.source_processing` and `denoising_strength` (issue 21): validated naming the
field, and invisible in the dump at their defaults, so a text-to-image job hashes and signs
exactly as before they existed."""

from __future__ import annotations

import pytest

from protocol.cost import image_cost
from protocol.errors import ValidationFailed
from protocol.infotext import parameters_text
from protocol.params import ImageParams, sampled_steps
from protocol.signing import canonical_json, params_hash, sha256_hex
from protocol.validation import parse

# The dump and hash of ImageParams(prompt="cat", seed=1) before the source fields existed.
OLD_DUMP = {
    "prompt": "cat",
    "negative_prompt": "",
    "width": 512,
    "height": 512,
    "steps": 20,
    "cfg_scale": 7.0,
    "sampler": "Euler a",
    "seed": 1,
    "n": 1,
    "model": None,
}


def test_a_txt2img_job_dumps_and_hashes_as_before() -> None:
    params = ImageParams(prompt="cat", seed=1)
    assert params.model_dump(mode="json") == OLD_DUMP
    assert params_hash(params) == sha256_hex(canonical_json(OLD_DUMP))
    # the defaults written out change nothing either
    spelled = ImageParams(
        prompt="cat", seed=1, source_processing="txt2img", denoising_strength=0.75
    )
    assert params_hash(spelled) == params_hash(params)
    # and what an older coordinator stored still parses to the same job
    assert ImageParams.model_validate_json(params.model_dump_json()) == params


def test_source_fields_are_dumped_and_hashed_when_set() -> None:
    params = ImageParams(prompt="cat", seed=1, source_processing="img2img")
    assert params.model_dump(mode="json") == {**OLD_DUMP, "source_processing": "img2img"}
    stronger = params.model_copy(update={"denoising_strength": 0.5})
    assert stronger.model_dump(mode="json")["denoising_strength"] == 0.5
    hashes = {params_hash(p) for p in (ImageParams(prompt="cat", seed=1), params, stronger)}
    assert len(hashes) == 3
    assert ImageParams.model_validate_json(stronger.model_dump_json()) == stronger


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"source_processing": "remix"}, "source_processing", "'img2img'"),
        ({"denoising_strength": 0}, "denoising_strength", "greater than or equal to 0.01"),
        ({"denoising_strength": 1.5}, "denoising_strength", "less than or equal to 1"),
        ({"denoising_strength": "0.5"}, "denoising_strength", "number"),
    ],
)
def test_bad_source_fields_name_the_field(
    fields: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        parse(ImageParams, {"prompt": "cat", **fields})
    problems = dict(caught.value.problems)
    assert field in problems, problems
    assert words in problems[field]


def test_a_strength_that_samples_no_step_is_refused() -> None:
    with pytest.raises(ValidationFailed, match=r"0.2 x steps 4 .* at least 5 steps") as caught:
        parse(
            ImageParams,
            {
                "prompt": "cat",
                "steps": 4,
                "source_processing": "img2img",
                "denoising_strength": 0.2,
            },
        )
    assert caught.value.field == "denoising_strength"
    # the default strength counts too
    with pytest.raises(ValidationFailed, match="at least 2 steps"):
        parse(ImageParams, {"prompt": "cat", "steps": 1, "source_processing": "inpainting"})
    # txt2img ignores the strength, so any value is fine there
    assert ImageParams(prompt="cat", steps=1, denoising_strength=0.2).steps == 1


@pytest.mark.parametrize(
    ("processing", "steps", "strength", "sampled"),
    [
        ("txt2img", 20, 0.3, 20),
        ("img2img", 20, 0.75, 15),
        ("img2img", 10, 0.7, 7),
        ("inpainting", 3, 1.0, 3),
        ("outpainting", 5, 0.2, 1),
    ],
)
def test_sampled_steps_follow_diffusers(
    processing: str, steps: int, strength: float, sampled: int
) -> None:
    params = ImageParams.model_validate(
        {
            "prompt": "cat",
            "steps": steps,
            "source_processing": processing,
            "denoising_strength": strength,
        }
    )
    assert sampled_steps(params) == sampled


def test_parameters_text_records_the_strength_and_mask_settings_only_with_a_source() -> None:
    plain = ImageParams(prompt="cat", steps=4, width=64, height=64)
    assert "Denoising" not in parameters_text(plain, 1, "tiny")
    inpaint = plain.model_copy(update={"source_processing": "inpainting"})
    assert parameters_text(inpaint, 1, "tiny") == (
        "cat\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 64x64, Model: tiny, "
        "Denoising strength: 0.75, Mask blur: 0, Mask mode: Inpaint masked, "
        "Masked content: original, Inpaint area: Whole picture, Source processing: inpainting"
    )
    outpaint = plain.model_copy(update={"source_processing": "outpainting"})
    assert parameters_text(outpaint, 1, "tiny").endswith(
        "Denoising strength: 0.75, Mask blur: 0, Mask mode: Inpaint masked, "
        "Masked content: original, Inpaint area: Whole picture, Source processing: outpainting"
    )
    img2img = plain.model_copy(update={"source_processing": "img2img", "denoising_strength": 0.5})
    assert parameters_text(img2img, 1, "tiny").endswith(
        "Model: tiny, Denoising strength: 0.5, Source processing: img2img"
    )


def test_source_digests_are_signed_and_absent_ones_change_nothing() -> None:
    params = ImageParams(prompt="cat", seed=1)
    assert params_hash(params.model_copy(update={"source_image": None})) == params_hash(params)
    source = ImageParams(prompt="cat", seed=1, source_processing="img2img", source_image="a" * 64)
    other = source.model_copy(update={"source_image": "b" * 64})
    assert source.model_dump(mode="json")["source_image"] == "a" * 64
    assert params_hash(source) != params_hash(other)
    with pytest.raises(ValidationFailed, match="source_image"):
        parse(ImageParams, {"prompt": "cat", "source_image": "not a digest"})


def test_a_source_image_costs_ai_hordes_one_and_a_half() -> None:
    base = ImageParams(prompt="cat", width=512, height=512, steps=20)
    assert image_cost(base) == 10  # txt2img unchanged
    assert image_cost(base.model_copy(update={"source_processing": "img2img"})) == 15
    assert image_cost(base.model_copy(update={"source_processing": "inpainting"})) == 15
