"""Tool-call parsers on the default model's real token streams: calls are found however the
text is cut, the first delta of a call carries its id and name, later deltas only arguments,
and the arguments concatenate to exactly the JSON the model wrote."""

from __future__ import annotations

import json

from rillm.parsers.message import MessageParser, parse_whole
from rillm.parsers.reasoning import make_reasoning_parser
from rillm.parsers.tool_calls import make_tool_parser
from tests.parsers.helpers import chunkings, feed_all

WEATHER_ARGS = '{"city": "Paris", "note": "say \\"hi\\" {not a brace}", "days": [1, 2]}'
HERMES = (
    'Let me check.<tool_call>\n{"name": "get_weather", "arguments": ' + WEATHER_ARGS
    + '}\n</tool_call>\n<tool_call>\n{"arguments": {"q": "rain"}, "name": "search"}\n'
    "</tool_call>"
)


def streamed(parser, chunks: list[str]) -> tuple[str, dict[int, dict]]:
    """Content, and each call rebuilt from its deltas the way an OpenAI client does."""
    content, calls = "", {}
    for parse in feed_all(parser.feed, parser.flush, chunks):
        content += parse.content
        for delta in parse.calls:
            if delta.index not in calls:
                assert delta.id is not None and delta.name, "a call's first delta names it"
                calls[delta.index] = {"id": delta.id, "name": delta.name, "arguments": ""}
            else:
                assert delta.id is None and delta.name is None
            calls[delta.index]["arguments"] += delta.arguments
    return content, calls


def test_the_tool_call_tags_are_split_across_tokens(smollm_tokenizer):
    assert len(smollm_tokenizer.encode("<tool_call>", add_special_tokens=False)) > 1


def test_hermes_calls_stream_whatever_the_chunking(smollm_tokenizer):
    for how, chunks in chunkings(smollm_tokenizer, HERMES):
        parser = make_tool_parser("hermes")
        content, calls = streamed(parser, chunks)
        assert content == "Let me check.\n", how
        assert [c["name"] for c in calls.values()] == ["get_weather", "search"], how
        assert calls[0]["arguments"] == WEATHER_ARGS, how
        assert json.loads(calls[1]["arguments"]) == {"q": "rain"}, how
        assert [(c.name, c.arguments) for c in parser.calls] == [
            (c["name"], c["arguments"]) for c in calls.values()]
        assert calls[0]["id"] != calls[1]["id"]


def test_arguments_stream_before_the_call_ends(smollm_tokenizer):
    parser = make_tool_parser("hermes")
    text = '<tool_call>{"name": "f", "arguments": {"text": "a long value'
    streamed_args = ""
    for chunk in chunkings(smollm_tokenizer, text).__next__()[1]:
        for delta in parser.feed(chunk).calls:
            streamed_args += delta.arguments
    assert streamed_args == '{"text": "a long value'


def test_a_block_that_is_not_a_call_stays_content(smollm_tokenizer):
    text = "Use <tool_call>like this</tool_call> when needed. <tool_"
    for how, chunks in chunkings(smollm_tokenizer, text):
        content, calls = streamed(make_tool_parser("hermes"), chunks)
        assert (content, calls) == (text, {}), how


def test_arguments_written_as_a_json_string_are_decoded():
    parser = make_tool_parser("hermes")
    content, calls = streamed(parser, [
        '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'])
    assert calls[0]["arguments"] == '{"x": 1}'
    content, calls = streamed(make_tool_parser("hermes"), ['<tool_call>{"name": "g"}</tool_call>'])
    assert calls[0]["arguments"] == "{}"


def test_llama3_json_calls_and_plain_answers(smollm_tokenizer):
    text = '{"name": "f", "parameters": {"k": [1, {"n": null}]}}; {"name": "g", "parameters": {}}'
    for how, chunks in chunkings(smollm_tokenizer, text):
        content, calls = streamed(make_tool_parser("llama3_json"), chunks)
        assert content == "", how
        assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
            ("f", {"k": [1, {"n": None}]}), ("g", {})], how
    for how, chunks in chunkings(smollm_tokenizer, "  Just an answer {with braces}."):
        assert streamed(make_tool_parser("llama3_json"), chunks) == (
            "  Just an answer {with braces}.", {}), how


def test_constrained_array_honours_parallel_tool_calls(smollm_tokenizer):
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {"y": 2}}]'
    for parallel, names in ((True, ["a", "b"]), (False, ["a"])):
        for how, chunks in chunkings(smollm_tokenizer, text):
            parser = make_tool_parser("json_array", parallel)
            _, calls = streamed(parser, chunks)
            assert [c["name"] for c in calls.values()] == names, how
            assert [c.name for c in parser.calls] == names


def test_named_function_streams_the_whole_output_as_arguments(smollm_tokenizer):
    for how, chunks in chunkings(smollm_tokenizer, WEATHER_ARGS):
        parser = make_tool_parser("named", function="get_weather")
        content, calls = streamed(parser, chunks)
        assert content == "" and calls[0]["name"] == "get_weather", how
        assert calls[0]["arguments"] == WEATHER_ARGS, how
        assert parser.calls[0].arguments == WEATHER_ARGS


def test_calls_after_a_thinking_block_are_found(smollm_tokenizer):
    text = "<think>The user wants weather.</think>\n" + HERMES
    whole = parse_whole(MessageParser(make_reasoning_parser("qwen3", "", {}),
                                      make_tool_parser("hermes")), text)
    assert whole.reasoning == "The user wants weather."
    assert whole.content == "Let me check.\n"
    for how, chunks in chunkings(smollm_tokenizer, text):
        parser = MessageParser(make_reasoning_parser("qwen3", "", {}), make_tool_parser("hermes"))
        deltas = feed_all(parser.feed, parser.finish, chunks)
        assert "".join(d.reasoning for d in deltas) == whole.reasoning, how
        assert "".join(d.content for d in deltas) == whole.content, how
        assert [c.name for c in parser.tool_calls] == ["get_weather", "search"], how
