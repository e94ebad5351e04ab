"""Grammar-constrained decoding (response_format) and OpenAI's presence/frequency penalties.

The grammar mask is checked on the tiny model's tokenizer and SmolLM2's (both byte-level
BPE): a random walk through the tokens it allows always ends in JSON that validates, the
tokens of a valid text are allowed one by one, and the end of the text only once the JSON
is whole. The penalties are checked against OpenAI's published formula, computed here in
numpy. The tiny model then generates under a schema at temperature 1.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import jsonschema_rs
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from protocol.errors import ValidationFailed
from protocol.text import JsonSchemaFormat, ResponseFormat, TextParams, schema_problem
from protocol.validation import parse
from tests.worker.llm.gateway.test_kobold import LocalSwarm, tiny_core  # noqa: F401
from worker.errors import InvalidGenerationInput
from worker.llm.gateway.core import CoreSettings, GenerationCore, sampling_params
from worker.llm.gateway.generation import SamplingParams, process_scores
from worker.llm.gateway.grammar import GrammarMask
from worker.llm.gateway.lm_head import LMHead
from worker.llm.gateway.samplers import apply_presence_frequency

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "colour", "tags"],
    "additionalProperties": False,
}


def schema_format(schema: dict[str, Any] = SCHEMA) -> ResponseFormat:
    spec = JsonSchemaFormat.model_validate({"name": "person", "schema": schema, "strict": True})
    return ResponseFormat(type="json_schema", json_schema=spec)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request: pytest.FixtureRequest, tiny_models: Path) -> Any:
    if request.param == "tiny":
        return AutoTokenizer.from_pretrained(tiny_models / "llm", local_files_only=True)
    path = os.environ.get("IDLEGRID_TEST_SMOLLM2")
    if not path or not Path(path).is_dir():
        pytest.skip("IDLEGRID_TEST_SMOLLM2 is not set to SmolLM2's folder")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def mask_of(tokenizer: Any, fmt: ResponseFormat) -> GrammarMask:
    grammar = fmt.grammar()
    assert grammar is not None
    return GrammarMask(grammar, tokenizer, [tokenizer.eos_token_id])


def decode(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def test_a_random_walk_through_the_mask_is_valid_json(tokenizer: Any) -> None:
    """Any token the mask allows keeps the text on the grammar: 20 walks picking
    uniformly among the allowed tokens all end in JSON that validates against the schema."""
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    validator = jsonschema_rs.validator_for(SCHEMA)
    for seed in range(20):
        rng = random.Random(seed)
        mask, ids = mask_of(tokenizer, schema_format()), []
        for _ in range(400):
            allowed = mask.allowed(vocab).nonzero().flatten().tolist()
            assert allowed
            token = rng.choice(allowed)
            if token == eos:
                break
            mask.advance(token)
            ids.append(token)
            if mask.done:
                break
        else:
            pytest.fail(f"walk {seed} did not finish: {decode(tokenizer, ids)!r}")
        value = json.loads(decode(tokenizer, ids))
        assert validator.is_valid(value), value


def test_valid_text_is_allowed_token_by_token_and_eos_only_at_the_end(tokenizer: Any) -> None:
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    # (compact JSON: a run of sampled whitespace could fill max_tokens)
    text = '{"name":"Ada","age":36,"colour":"blue","tags":[true,false]}'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    mask = mask_of(tokenizer, schema_format())
    start = mask.allowed(vocab)
    # the first token must begin the object; the end of the text may not come yet
    assert not start[eos]
    for token in start.nonzero().flatten().tolist():
        assert decode(tokenizer, [token]).startswith("{"), decode(tokenizer, [token])
    not_json = tokenizer("x", add_special_tokens=False)["input_ids"][0]
    assert not start[not_json]
    for i, token in enumerate(ids):
        allowed = mask.allowed(vocab)
        assert allowed[token], (i, decode(tokenizer, ids[: i + 1]))
        assert not allowed[eos] and not mask.done
        mask.advance(token)
    assert mask.done and mask.allowed(vocab)[eos]


def test_masked_scores_keep_only_the_allowed_tokens(tokenizer: Any) -> None:
    """The mask covers the whole logits row, a padded LM head's extra ids included."""
    vocab = len(tokenizer) + 5
    mask = mask_of(tokenizer, ResponseFormat(type="json_object"))
    scores = mask.apply(torch.zeros(1, vocab))
    allowed = torch.isfinite(scores[0])
    assert allowed.equal(mask.allowed(vocab)) and not allowed[len(tokenizer) :].any()
    assert 0 < int(allowed.sum()) < len(tokenizer)
    with pytest.raises(InvalidGenerationInput, match="response_format"):
        mask.advance(tokenizer("x", add_special_tokens=False)["input_ids"][0])


def test_schemas_llguidance_cannot_compile_are_named() -> None:
    assert schema_problem(SCHEMA) is None
    # oneOf is taken as anyOf (pydantic's discriminated unions)
    assert schema_problem({"oneOf": [{"type": "string"}, {"type": "integer"}]}) is None
    for bad, words in (
        ({"type": "strng"}, "strng"),
        ({"type": "string", "pattern": "(("}, "regex"),
        ({"$ref": "#/nowhere"}, "nowhere"),
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "Unsatisfiable"),
        ({"not": {"type": "string"}}, "not"),
    ):
        problem = schema_problem(bad)
        assert problem is not None and words in problem, problem
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": bad}}
        with pytest.raises(ValidationFailed) as caught:
            parse(TextParams, {"prompt": "x", "response_format": fmt})
        ((field, message),) = caught.value.problems
        assert field == "response_format.json_schema.schema" and words in message


def test_response_format_and_penalties_leave_old_params_as_they_were() -> None:
    plain = TextParams(prompt="x")
    used = TextParams(
        prompt="x",
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        response_format=schema_format(),
    )
    extra = set(used.model_dump(mode="json")) - set(plain.model_dump(mode="json"))
    assert extra == {"presence_penalty", "frequency_penalty", "response_format"}
    assert used.model_dump(mode="json")["response_format"]["json_schema"]["schema"] == SCHEMA
    assert TextParams.model_validate_json(used.model_dump_json()) == used
    sampling = sampling_params(used)
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -0.25)
    assert sampling.grammar == schema_format().grammar()
    assert sampling_params(plain).grammar is None


def openai_penalties(
    logits: np.ndarray, generated: list[int], presence: float, freq: float
) -> np.ndarray:
    """OpenAI's documented formula: mu[j] - c[j] * frequency - float(c[j] > 0) * presence."""
    out = logits.astype(np.float64).copy()
    for j in range(out.shape[-1]):
        c = generated.count(j)
        out[0, j] -= c * freq + float(c > 0) * presence
    return out


def test_presence_and_frequency_penalties_follow_openais_formula() -> None:
    logits = torch.randn(1, 32, generator=torch.Generator().manual_seed(3)) * 3
    generated = [4, 4, 4, 9, 17, 9, 31]
    for presence, frequency in ((0.6, 0.0), (0.0, 0.8), (1.5, -0.5), (-2.0, 2.0)):
        ours = apply_presence_frequency(logits, torch.tensor([generated]), presence, frequency)
        np.testing.assert_allclose(
            ours.numpy(), openai_penalties(logits.numpy(), generated, presence, frequency), 1e-6
        )
    # through process_scores: only the tokens after the prompt count, greedy included
    prompt = [1, 2, 3, 4, 20]
    context = torch.tensor([prompt + generated])
    params = SamplingParams(temperature=0.0, presence_penalty=0.7, frequency_penalty=0.3)
    got = process_scores(logits, context, params, prompt_length=len(prompt))
    np.testing.assert_allclose(
        got.numpy(), openai_penalties(logits.numpy(), generated, 0.7, 0.3), rtol=1e-6
    )
    with pytest.raises(InvalidGenerationInput, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)


async def test_the_tiny_model_writes_schema_json_at_temperature_1(
    tiny_core: GenerationCore,  # noqa: F811
) -> None:
    """Whenever a generation stops (not cut by max_tokens), its text validates."""
    validator = jsonschema_rs.validator_for(SCHEMA)
    stopped = 0

    async def ignore(delta: str) -> None:
        return None

    for seed in range(6):
        params = TextParams(
            prompt="Describe a person as JSON:",
            max_tokens=96,
            temperature=1.0,
            seed=seed,
            response_format=schema_format(),
        )
        result = (await tiny_core.run(params, ignore)).result
        if result.finish_reason == "stop":
            stopped += 1
            assert validator.is_valid(json.loads(result.text)), result.text
        else:
            assert result.completion_tokens == 96
    assert stopped >= 3  # the schema keeps the answer short


@pytest.fixture(scope="module")
def smollm2_core() -> GenerationCore:
    """SmolLM2 with all its blocks in this process."""
    path = os.environ.get("IDLEGRID_TEST_SMOLLM2")
    if not path or not Path(path).is_dir():
        pytest.skip("IDLEGRID_TEST_SMOLLM2 is not set to SmolLM2's folder")
    model = Path(path)
    settings = CoreSettings(model=model, model_name="smollm2", initial_peers=(), check_rate=0.0)
    return GenerationCore(
        settings,
        LMHead.load(model),
        AutoTokenizer.from_pretrained(model, local_files_only=True),
        swarm=None,  # type: ignore[arg-type]  # no swarm: the blocks run here
        open_session=LocalSwarm(model).session,  # type: ignore[arg-type]
    )


@pytest.mark.slow
async def test_smollm2_writes_schema_json_greedy_and_sampled(
    smollm2_core: GenerationCore,
) -> None:
    """SmolLM2 (its chat template, its byte-level BPE) under a schema."""
    core = smollm2_core
    validator = jsonschema_rs.validator_for(SCHEMA)

    async def ignore(delta: str) -> None:
        return None

    stopped = 0
    ask = "Describe a person called Ada as JSON with name, age, colour and tags."
    for temperature, seed in ((0.0, 0), (1.0, 1), (1.0, 2)):
        params = TextParams(
            messages=[{"role": "user", "content": ask}],  # type: ignore[list-item]
            max_tokens=64,
            temperature=temperature,
            seed=seed,
            response_format=schema_format(),
        )
        result = (await core.run(params, ignore)).result
        if result.finish_reason == "stop":
            stopped += 1
            assert validator.is_valid(json.loads(result.text)), result.text
        else:
            assert result.completion_tokens == 64
    assert stopped >= 1
