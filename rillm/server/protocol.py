"""The OpenAI wire format: request bodies as pydantic models (the only pydantic in rillm).

Unknown fields are rejected (a 400 naming the field) rather than silently ignored, so a client
never believes a parameter took effect when it did not. The engine's extras that SDK users
pass through `extra_body` (top_k, min_p, ...) are ordinary optional fields here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
)


def _unicode(value: str) -> str:
    """JSON may carry a lone UTF-16 surrogate (`"\\ud800"`), which Python keeps in a str but
    no tokenizer, grammar compiler or UTF-8 encoder takes: a 400 here, not a 500 later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone UTF-16 surrogate (U+{ord(value[exc.start]):04X} at "
                         f"character {exc.start}), which is not Unicode text") from None
    return value


def _unicode_tree(value: dict[str, Any]) -> dict[str, Any]:
    """Every key and string inside a free-form JSON object (schemas, template kwargs), walked
    without recursion (the JSON parser already bounds its depth)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _unicode(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


Text = Annotated[StrictStr, AfterValidator(_unicode)]
"""A string that is Unicode text (every string a request sends)."""
JSONObject = Annotated[dict[str, Any], AfterValidator(_unicode_tree)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False
    include_obfuscation: StrictBool | None = None
    """Accepted; rillm's events carry no obfuscation padding (nothing to turn off)."""


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class MediaPart(_Strict):
    """An image, audio or file part: the models rillm serves read text only (a 400 says so)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file"]


class ChatRefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: Text


class FunctionCall(_Strict):
    name: Text
    arguments: Text


class ToolCall(_Strict):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


ContentPart = Annotated[TextPart | MediaPart | ChatRefusalPart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None
    # What clients send back when they append an earlier response's message as it came;
    # accepted, not rendered (chat templates show the answer, not the thinking).
    reasoning: Text | None = None
    reasoning_content: Text | None = None
    refusal: Text | None = None
    function_call: FunctionCall | None = None
    """The legacy form of one tool call (an assistant message); rendered as one."""
    audio: Any = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text if isinstance(part, TextPart) else
                           part.refusal if isinstance(part, ChatRefusalPart) else ""
                           for part in self.content)
        return self.content or ""


class FunctionDefinition(_Strict):
    name: Text = Field(min_length=1)
    description: Text | None = None
    parameters: JSONObject | None = None
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: Text


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Strict):
    name: Text = "response"
    description: Text | None = None
    json_schema: JSONObject | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Strict):
    """vLLM's `structured_outputs` (extra_body): exactly one constraint."""

    json_schema: JSONObject | Text | None = Field(default=None, alias="json")
    json_object: StrictBool | None = None
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None


Number = Annotated[float, Field(strict=True)]
"""An int or a float; a string is a wrong type, not a number."""


class SamplingFields(_Strict):
    """Fields both endpoints share."""

    model: Text | None = None
    n: StrictInt = 1
    temperature: Number | None = None
    top_p: Number | None = None
    max_tokens: StrictInt | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # The engine's extras (extra_body in the openai SDK).
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    stream_interval: StrictInt | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None


class ChatCompletionRequest(SamplingFields):
    """Every field of the openai SDK's chat CompletionCreateParams: honoured, mapped, or
    accepted and ignored (README, "Request parameters"), never an unknown-field 400."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    chat_template: Text | None = None
    chat_template_kwargs: JSONObject | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    include_reasoning: StrictBool = True
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: Any = None
    # Accepted and ignored: they ask for nothing the output depends on here.
    metadata: dict[str, Text] | None = None
    store: StrictBool | None = None
    service_tier: Text | None = None
    prediction: Any = None
    prompt_cache_key: Text | None = None
    prompt_cache_retention: Text | None = None
    prompt_cache_options: Any = None
    safety_identifier: Text | None = None
    moderation: Any = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: Any = None


IGNORED_CHAT_FIELDS = ("metadata", "store", "service_tier", "prediction", "prompt_cache_key",
                       "prompt_cache_retention", "prompt_cache_options", "safety_identifier",
                       "moderation", "verbosity", "web_search_options")
"""Chat fields in OpenAI's spec that rillm accepts and does not act on (one debug line)."""


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: Text | None = None
    best_of: StrictInt | None = None


# The Responses API (POST /v1/responses): input items, function tools, text formats. Every
# field of the openai SDK's ResponseCreateParams is accepted; those that need state rillm does
# not keep (stored responses, conversations, prompts, background runs) are a 400 when set.


class InputText(_Strict):
    type: Literal["input_text", "output_text"]
    text: Text
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMedia(_Strict):
    """An image, file or audio part: this server's models read text only (a 400 says so)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["input_image", "input_file", "input_audio"]


class InputMessage(_Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | list[InputText | InputMedia | RefusalPart]
    id: Text | None = None
    status: Text | None = None
    phase: Text | None = None


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: Text


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: Text
    name: Text
    arguments: Text
    id: Text | None = None
    status: Text | None = None
    namespace: Text | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: Text
    output: Text | list[InputText | InputMedia]
    id: Text | None = None
    status: Text | None = None
    name: Text | None = None
    namespace: Text | None = None


class ReasoningItem(_Strict):
    """An earlier response's reasoning sent back: accepted, not rendered (as chat templates
    show the answer, not the thinking)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["reasoning"]


def _item_type(item: Any) -> str:
    """An input item's kind: its `type`, "message" where it has none (EasyInputMessage)."""
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "")
    return kind if isinstance(kind, str) else ""


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type)]


class FunctionTool(_Strict):
    type: Literal["function"]
    name: Text = Field(min_length=1)
    description: Text | None = None
    parameters: JSONObject | None = None
    strict: StrictBool | None = None


class ResponsesToolChoice(_Strict):
    type: Literal["function"]
    name: Text


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Text | None = None
    description: Text | None = None
    json_schema: JSONObject | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesStreamOptions(_Strict):
    include_obfuscation: StrictBool | None = None


class EngineExtras(_Strict):
    """The engine's extras (the SDKs' extra_body) on the APIs translated into chat requests,
    as chat and completions take them."""

    seed: StrictInt | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool = False
    stream_interval: StrictInt | None = None
    structured_outputs: StructuredOutputsField | None = None
    chat_template_kwargs: JSONObject | None = None


class ResponsesRequest(EngineExtras):
    model: Text | None = None
    input: Text | list[InputItem]
    instructions: Text | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    max_output_tokens: StrictInt | None = None
    max_tool_calls: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_logprobs: StrictInt | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: StrictBool = False
    stream_options: ResponsesStreamOptions | None = None
    metadata: dict[str, Text] | None = None
    store: StrictBool | None = None
    previous_response_id: Text | None = None
    conversation: Any = None
    prompt: Any = None
    background: StrictBool | None = None
    include: list[Text] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    prompt_cache_retention: Text | None = None
    service_tier: Text | None = None
    # Accepted for the SDK's sake; nothing here acts on them.
    access_programs: Any = None
    background_options: Any = None
    context_management: Any = None
    image: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None


# Anthropic's Messages API (POST /v1/messages): content blocks, tools, thinking. Fields of
# the anthropic SDK's MessageCreateParams that change nothing here (cache_control, metadata,
# service tier, ...) are accepted; unknown ones are a 400 as on OpenAI's routes.


class _Block(_Strict):
    model_config = ConfigDict(extra="forbid")
    cache_control: Any = None


class AnthropicText(_Block):
    type: Literal["text"]
    text: Text
    citations: Any = None


class AnthropicMedia(_Block):
    """Images and documents: this server's models read text only (a 400 says so)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image", "document", "search_result", "container_upload"]


class AnthropicToolUse(_Block):
    type: Literal["tool_use"]
    id: Text
    name: Text
    input: JSONObject
    caller: Any = None
    toolset_name: Text | None = None


class AnthropicToolResult(_Block):
    type: Literal["tool_result"]
    tool_use_id: Text
    content: Text | list[AnthropicText | AnthropicMedia] | None = None
    is_error: StrictBool | None = None
    toolset_name: Text | None = None


class AnthropicThinking(_Block):
    """Earlier thinking sent back: accepted, not rendered."""

    model_config = ConfigDict(extra="allow")
    type: Literal["thinking", "redacted_thinking"]


AnthropicBlock = Annotated[AnthropicText | AnthropicMedia | AnthropicToolUse
                           | AnthropicToolResult | AnthropicThinking,
                           Field(discriminator="type")]


class AnthropicMessage(_Strict):
    role: Literal["user", "assistant"]
    content: Text | list[AnthropicBlock]


class AnthropicTool(_Strict):
    name: Text = Field(min_length=1)
    description: Text | None = None
    input_schema: JSONObject
    type: Literal["custom"] | None = None
    strict: StrictBool | None = None
    cache_control: Any = None
    allowed_callers: Any = None
    defer_loading: StrictBool | None = None
    eager_input_streaming: StrictBool | None = None
    input_examples: Any = None


class AnthropicToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: Text | None = None
    disable_parallel_tool_use: StrictBool | None = None


class AnthropicThinkingConfig(_Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: StrictInt | None = None
    display: Text | None = None


class MessagesRequest(EngineExtras):
    model: Text | None = None
    max_tokens: StrictInt
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Text | list[AnthropicText] | None = None
    stop_sequences: list[Text] | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    stream: StrictBool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: AnthropicThinkingConfig | None = None
    metadata: dict[str, Any] | None = None
    # Accepted for the SDK's sake; nothing here acts on them.
    service_tier: Text | None = None
    cache_control: Any = None
    container: Any = None
    diagnostics: Any = None
    inference_geo: Text | None = None
    output_config: Any = None
    speed: Text | None = None


class CountTokensRequest(_Strict):
    model: Text | None = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Text | list[AnthropicText] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: AnthropicThinkingConfig | None = None
    cache_control: Any = None


class TokenizeRequest(_Strict):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    chat_template: Text | None = None
    chat_template_kwargs: JSONObject | None = None
    tools: list[Tool] | None = None


class DetokenizeRequest(_Strict):
    model: Text | None = None
    tokens: list[StrictInt]


def error_body(message: str, type_: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
