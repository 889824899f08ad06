"""Every failure as OpenAI's error object, with a 4xx status for anything the client did."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rillm.sampling_params import InvalidParameterError
from rillm.server.protocol import error_body

logger = logging.getLogger(__name__)

def error_type(status: int) -> str:
    """OpenAI's `type` for a status: the client's mistake, its rate, or the server."""
    if status == 429:
        return "rate_limit_exceeded"
    if status == 503:
        return "service_unavailable"
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                   429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


def anthropic_route(path: str) -> bool:
    """Anthropic's Messages API, whose clients read Anthropic's error shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, error_type(self.status), self.param,
                          self.code)

    def response(self, path: str = "") -> JSONResponse:
        """The error as the route at `path` answers it (Anthropic's shape on its API)."""
        body = anthropic_error_body(self.status, self.message) if anthropic_route(path) \
            else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    @classmethod
    def from_invalid(cls, exc: InvalidParameterError,
                     params: Mapping[str, str] | None = None) -> APIError:
        """A 400 for the engine's error; `params` renames the engine's parameter names to the
        request's (chat's `messages` for the prompt, `max_completion_tokens`)."""
        param = (params or {}).get(exc.param, exc.param)
        return cls(400, exc.message if exc.code else str(exc), param=param, code=exc.code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(InvalidParameterError)
    async def invalid_parameter(request: Request, exc: InvalidParameterError) -> JSONResponse:
        return APIError.from_invalid(exc).response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_api_error(exc.errors()).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail),
                        headers=getattr(exc, "headers", None)).response(request.url.path)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return APIError(500, "internal server error").response(request.url.path)


def validation_api_error(errors: Any) -> APIError:
    """The first pydantic error as a 400 whose `param` is the field's dotted path."""
    errors = list(errors)
    # Of a union's alternatives, the deepest error says most (e.g. content.0.type, not "not a
    # string").
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {
        "loc": (), "msg": "invalid request", "type": ""}
    param = ".".join(_field_path(first.get("loc", ()))) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    if param is None:
        return APIError(400, "the request body must be a JSON object", code="invalid_value")
    if kind == "extra_forbidden":
        return APIError(400, f"unrecognized request argument: {param}", param=param,
                        code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"{param}: a required field is missing", param=param)
    return APIError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param,
                    code="invalid_value")


def _field_path(loc: Any) -> list[str]:
    """pydantic's error location as the request's field path: without "body", union-member
    tags ("str", "list[...]") and the tag a tagged union adds before its member's fields
    (content.0.text.text is content.0.text)."""
    path: list[str] = []
    tag_next = False
    for part in (str(p) for p in loc if p != "body"):
        if _is_type_tag(part):
            tag_next = tag_next or "tagged-union[" in part
            continue
        if tag_next and not part.isdigit():
            tag_next = False
            continue
        path.append(part)
    return path


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list", "dict"} or "[" in part \
        or part.startswith(("function-", "constrained-"))
