"""The OpenAPI schema as the server really answers: FastAPI's generated schema, with the errors
every route can give declared in OpenAI's error shape (a bad body is a 400 here, never
FastAPI's 422), streams as `text/event-stream`, /metrics as Prometheus text and /health's 200
with no body. Fuzzed against the live server by tests/server/test_schema_fuzz.py."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

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
_GENERATION = {"429": "The queue is full (Retry-After)"}
# One Server-Sent Event of a stream (`stream: true`): its `data` is a chunk's JSON or [DONE].
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string"}, "id": {"type": "string"}, "event": {"type": "string"}}}
_STREAMING = ("/v1/chat/completions", "/v1/completions")


def install_openapi(app: FastAPI) -> None:
    """Replace `app.openapi` with the corrected schema (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = _correct(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _correct(schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            statuses = dict(_EVERY_ROUTE)
            if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
                statuses |= _MODEL_ROUTE
            if path in _STREAMING:
                statuses |= _GENERATION
                ok = responses["200"].setdefault("content", {})
                ok["text/event-stream"] = {"schema": _SSE_EVENT}
            for status, description in statuses.items():
                responses.setdefault(status, {"description": description, "content": error})
    _plain(schema, "/metrics", {"text/plain": {"schema": {"type": "string"}}},
           "Prometheus metrics in the text exposition format")
    _plain(schema, "/health", None, "Ready: the model is loaded and the engine runs")
    health = schema["paths"]["/health"]["get"]["responses"]
    health["503"] = {"description": "Loading, load failed, or the engine stopped",
                     "content": {"application/json": {"schema": {
                         "type": "object", "properties": {"status": {"type": "string"}}}}}}
    return schema


def _plain(schema: dict[str, Any], path: str, content: dict[str, Any] | None,
           description: str) -> None:
    ok: dict[str, Any] = {"description": description}
    if content is not None:
        ok["content"] = content
    schema["paths"][path]["get"]["responses"]["200"] = ok
