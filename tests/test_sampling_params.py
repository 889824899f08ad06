import pytest

from rillm.sampling_params import MAX_LOGPROBS, InvalidParameterError, SamplingParams


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_invalid_values_raise_naming_the_parameter(kwargs, param):
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param
    assert str(err.value).startswith(param)
    assert isinstance(err.value, ValueError)


def test_stop_accepts_a_string_or_a_list():
    assert SamplingParams(stop="x").stop_strings == ("x",)
    assert SamplingParams(stop=["a", "b"]).stop_strings == ("a", "b")
    assert SamplingParams().stop_strings == ()


def test_a_constraint_is_bounded_in_size():
    from rillm.structured_outputs import MAX_CONSTRAINT_CHARS, StructuredOutputsParams

    with pytest.raises(InvalidParameterError, match="at most") as error:
        StructuredOutputsParams(regex="a" * (MAX_CONSTRAINT_CHARS + 1))
    assert error.value.param == "structured_outputs.regex"
    with pytest.raises(InvalidParameterError, match="at most"):
        StructuredOutputsParams(choice=["x" * 1000] * 70, param="response_format")
    assert StructuredOutputsParams(regex="a" * 1000).regex
