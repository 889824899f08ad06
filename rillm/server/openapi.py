"""The OpenAPI schema as the server really answers. What one route alone gives is declared on
that route (`responses=` below, used by app.py: streams as `text/event-stream`, the queue's 429,
/health's 503); `install_openapi` adds what every route can give: the errors in OpenAI's shape
(a bad body is a 400 here, never FastAPI's 422). Fuzzed against the live server by
tests/server/test_schema_fuzz.py."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from rillm.server.errors import anthropic_route

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
# Anthropic's Messages API answers errors in Anthropic's shape (rillm/server/errors.py).
ANTHROPIC_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object",
        "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
    }},
}
_ANTHROPIC_ERROR_CONTENT = {"application/json": {"schema": {
    "$ref": "#/components/schemas/AnthropicErrorResponse"}}}

# One Server-Sent Event of a stream (`stream: true`): its `data` is a chunk's JSON or [DONE].
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string"}, "id": {"type": "string"}, "event": {"type": "string"}}}
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}},
    429: {"description": "The queue is full (Retry-After)", "content": _ERROR_CONTENT},
}
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Ready: the model is loaded and the engine runs"},
    503: {"description": "Loading, load failed, or the engine stopped",
          "content": {"application/json": {"schema": {
              "type": "object", "properties": {"status": {"type": "string"}}}}}},
}

# Status -> what it means; every route may give these (the gate's checks run before routing).
_EVERY_ROUTE = {
    "400": "Invalid request (OpenAI's error object; `param` names the field)",
    "401": "Missing or wrong API key (when the server has one)",
    "408": "The request's headers or body arrived too slowly",
    "413": "The request body is larger than --max-request-body-bytes",
    "431": "The request line and headers are too large",
    "503": "Loading, stopped, or too many open connections (Retry-After)",
}
# Routes that run the model or name one.
_MODEL_ROUTE = {"404": "No such model, or a resumed stream whose window has passed"}


def install_openapi(app: FastAPI) -> None:
    """Replace `app.openapi` with the corrected schema (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = _declare_errors(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_errors(schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = ERROR_SCHEMA
    components["AnthropicErrorResponse"] = ANTHROPIC_ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            statuses = dict(_EVERY_ROUTE)
            if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
                statuses |= _MODEL_ROUTE
            for status, description in statuses.items():
                responses.setdefault(status, {"description": description,
                                              "content": _ERROR_CONTENT})
            if anthropic_route(path):
                for status, response in responses.items():
                    if str(status).isdigit() and int(status) >= 400:
                        responses[status] = {**response, "content": _ANTHROPIC_ERROR_CONTENT}
    return schema
