"""Structured outputs on the default model's real weights: whatever the model would say, the
output matches the constraint, and unconstrained neighbours in the batch are untouched."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from rillm.sampling_params import InvalidParameterError, SamplingParams
from rillm.structured_outputs import StructuredOutputsParams
from tests.engine.helpers import chat_ids, run

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "mood": {"enum": ["happy", "sad", "calm"]},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}


def sampled(n: int, **constraint) -> dict[str, SamplingParams]:
    return {
        f"r{i}": SamplingParams(temperature=1.0, seed=1000 + i, max_tokens=120,
                                structured_outputs=StructuredOutputsParams(**constraint))
        for i in range(n)
    }


def test_sampled_json_always_validates_against_the_schema(default_engine):
    ids = chat_ids(default_engine.tokenizer, "Invent a person and describe them.")
    params = sampled(12, json=PERSON)
    outputs = run(default_engine, {k: ids for k in params}, params)
    texts = set()
    for out in outputs.values():
        choice = out.outputs[0]
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(json.loads(choice.text), PERSON)
        texts.add(choice.text)
    assert len(texts) > 1, "temperature 1 with different seeds should not all agree"


def test_regex_and_choice_always_match(default_engine):
    ids = chat_ids(default_engine.tokenizer, "What is the date of the moon landing?")
    pattern = r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-3]\d"
    dates = run(default_engine, {"r": ids} | {f"r{i}": ids for i in range(5)},
                {"r": SamplingParams(temperature=0, max_tokens=30,
                                     structured_outputs=StructuredOutputsParams(regex=pattern))}
                | sampled(5, regex=pattern))
    for out in dates.values():
        assert re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop"

    options = ["red", "green", "blue and yellow"]
    ids = chat_ids(default_engine.tokenizer, "Pick a colour.")
    picks = run(default_engine, {f"r{i}": ids for i in range(6)}, sampled(6, choice=options))
    assert all(out.outputs[0].text in options for out in picks.values())


def test_ebnf_grammar_and_json_object(default_engine):
    ids = chat_ids(default_engine.tokenizer, "Count to three.")
    grammar = 'root ::= "one" (", " item){2}\nitem ::= "two" | "three" | "four"'
    out = run(default_engine, {"g": ids, "j": ids}, {
        "g": SamplingParams(temperature=1.0, seed=3, max_tokens=20,
                            structured_outputs=StructuredOutputsParams(grammar=grammar)),
        "j": SamplingParams(temperature=0, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(json_object=True)),
    })
    assert re.fullmatch(r"one(, (two|three|four)){2}", out["g"].outputs[0].text)
    j = out["j"].outputs[0]
    assert j.finish_reason in ("stop", "length")
    if j.finish_reason == "stop":
        assert isinstance(json.loads(j.text), dict)
    else:
        assert j.text.startswith("{")


def test_unconstrained_neighbours_are_unchanged(default_engine):
    ids = chat_ids(default_engine.tokenizer, "Describe a sunrise.")
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = run(default_engine, {"free": ids}, free)["free"].outputs[0]
    mixed = run(default_engine, {"free": ids, "r0": ids, "r1": ids},
                {"free": free} | sampled(2, regex=r"[A-Z][a-z]{3,8}"))
    assert all(re.fullmatch(r"[A-Z][a-z]{3,8}", mixed[k].outputs[0].text) for k in ("r0", "r1"))
    assert mixed["free"].outputs[0].token_ids == alone.token_ids


def test_grammar_ends_the_output_despite_min_tokens_and_ignore_eos(default_engine):
    ids = chat_ids(default_engine.tokenizer, "Yes or no?")
    out = run(default_engine, {"a": ids}, SamplingParams(
        temperature=0, max_tokens=50, min_tokens=10, ignore_eos=True,
        structured_outputs=StructuredOutputsParams(choice=["yes", "no"])))["a"].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_constrained_requests_survive_preemption(make_engine, smollm_tokenizer):
    tight = make_engine(num_kv_blocks=24, block_size=8, max_model_len=160)
    ids = chat_ids(smollm_tokenizer, "Invent a person.")
    params = sampled(6, json=PERSON)
    outputs = run(tight, {k: ids for k in params}, params)
    assert tight.scheduler.num_preemptions > 0
    for out in outputs.values():
        jsonschema.validate(json.loads(out.outputs[0].text), PERSON)
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks


@pytest.mark.parametrize(("constraint", "param"), [
    ({"json": '{"type": "objec"}'}, "structured_outputs.json"),
    ({"regex": "(ab"}, "structured_outputs.regex"),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar"),
])
def test_constraints_that_do_not_compile_name_the_field(default_engine, constraint, param):
    params = SamplingParams(structured_outputs=StructuredOutputsParams(**constraint))
    with pytest.raises(InvalidParameterError) as info:
        default_engine.validate([1, 2, 3], params)
    assert info.value.param == param
    assert "cannot be compiled" in str(info.value) and ".cc:" not in str(info.value)


def test_exactly_one_constraint():
    with pytest.raises(InvalidParameterError):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(InvalidParameterError):
        StructuredOutputsParams()
    with pytest.raises(InvalidParameterError):
        StructuredOutputsParams(choice=[])
