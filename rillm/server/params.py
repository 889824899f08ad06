"""From an OpenAI request body to the engine's SamplingParams, with the checks that need
the model (context length)."""

from __future__ import annotations

from collections.abc import Mapping

from rillm.sampling_params import InvalidParameterError, SamplingParams
from rillm.server.errors import APIError
from rillm.server.protocol import SamplingFields
from rillm.structured_outputs import StructuredOutputsParams


def structured_outputs(body: SamplingFields) -> StructuredOutputsParams | None:
    """The constraint from `response_format` or `structured_outputs` (not both)."""
    response_format = body.response_format
    if response_format is not None and response_format.type == "text":
        response_format = None
    if response_format is not None and body.structured_outputs is not None:
        raise APIError(400, "use either response_format or structured_outputs, not both",
                       param="response_format")
    try:
        if response_format is not None:
            if response_format.type == "json_object":
                return StructuredOutputsParams(json_object=True, param="response_format")
            spec = response_format.json_schema
            if spec is None or spec.json_schema is None:
                raise APIError(400, "response_format of type json_schema needs "
                               "json_schema.schema", param="response_format.json_schema")
            return StructuredOutputsParams(json=spec.json_schema, param="response_format")
        so = body.structured_outputs
        if so is None:
            return None
        return StructuredOutputsParams(json=so.json_schema, json_object=bool(so.json_object),
                                       regex=so.regex, choice=so.choice, grammar=so.grammar)
    except InvalidParameterError as exc:
        raise APIError.from_invalid(exc) from None


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    constraint: StructuredOutputsParams | None = None,
                    defaults: Mapping[str, float] | None = None) -> SamplingParams:
    """Raises APIError(400) naming the parameter for any bad value. `defaults`: the model's
    generation_config.json values for what the request leaves unset."""
    model = defaults or {}

    def given(value: float | None, name: str, fallback: float) -> float:
        return value if value is not None else model.get(name, fallback)

    bias = None
    if body.logit_bias:
        try:
            bias = {int(token): value for token, value in body.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids", param="logit_bias") from None
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true",
                       param="stream_options")
    if body.stream_interval is not None and body.stream_interval < 1:
        raise APIError(400, "stream_interval must be at least 1", param="stream_interval")
    try:
        return SamplingParams(
            n=body.n,
            temperature=given(body.temperature, "temperature", 1.0),
            top_p=given(body.top_p, "top_p", 1.0),
            top_k=int(given(body.top_k, "top_k", 0)),
            min_p=given(body.min_p, "min_p", 0.0),
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=given(body.repetition_penalty, "repetition_penalty", 1.0),
            logit_bias=bias,
            seed=body.seed,
            max_tokens=(max_tokens if max_tokens is not None or "max_new_tokens" not in model
                        else int(model["max_new_tokens"])),
            min_tokens=body.min_tokens,
            stop=body.stop,
            stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos,
            include_stop_str_in_output=body.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
            spaces_between_special_tokens=body.spaces_between_special_tokens,
            structured_outputs=constraint,
        )
    except InvalidParameterError as exc:
        raise APIError.from_invalid(exc) from None
