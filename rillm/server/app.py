"""The FastAPI application: routes, API keys, CORS, health, and the engine's lifecycle.

The HTTP socket opens at once and the model loads in the background, so /health answers
503 while loading and 200 once requests can be served.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from rillm import __version__
from rillm.engine.protocol import ServingEngine
from rillm.server.config import ServerConfig
from rillm.server.errors import APIError, install_error_handlers
from rillm.server.gate import RequestGate, allowed_hosts
from rillm.server.metrics import EngineCollector, RequestMetricsRecorder, metrics_text
from rillm.server.offload import decode, encode
from rillm.server.openapi import GENERATION_RESPONSES, HEALTH_RESPONSES, install_openapi
from rillm.server.page import install_page
from rillm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CountTokensRequest,
    DetokenizeRequest,
    MessagesRequest,
    ResponsesRequest,
    TokenizeRequest,
)
from rillm.server.resume import StreamRegistry
from rillm.server.sse import EventStreamResponse
from rillm.server.templates import TemplateSandbox

logger = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses",
                              "/v1/messages"})
"""The routes whose requests take places in the queue."""


@dataclass
class ServerState:
    config: ServerConfig
    engine: ServingEngine | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    num_active: int = 0
    """Generation requests accepted and not yet finished."""
    num_sequences: int = 0
    """The sequences those requests start (n, and each prompt of a completions list, count)."""
    on_ready: Callable[[], None] | None = None
    on_failure: Callable[[str], None] | None = None
    streams: StreamRegistry | None = None
    """Streams that outlive their connection (--stream-resume-window); None: off."""
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(
        auto_describe=False))
    """/metrics' series."""
    recorder: RequestMetricsRecorder | None = None
    """vLLM's per-request counters and histograms, once the engine is loaded."""
    templates: TemplateSandbox | None = None
    """Where requests' own chat templates render (--trust-request-chat-template); None: off."""

    @property
    def model_name(self) -> str:
        return self.config.served_model_names[0]

    def ready_engine(self) -> ServingEngine:
        if self.engine is None:
            message = self.load_error or "the model is still loading"
            raise APIError(503, message, headers={"Retry-After": "5"})
        if not self.engine.is_running:
            raise APIError(503, "the engine has stopped; restart the server")
        return self.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.config.served_model_names:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")


def create_app(config: ServerConfig, load_engine: Callable[[], ServingEngine],
               state: ServerState | None = None) -> FastAPI:
    state = state or ServerState(config)
    if config.stream_resume_window > 0:
        state.streams = StreamRegistry(config.stream_resume_window)
    if config.trust_request_chat_template:
        state.templates = TemplateSandbox(config.chat_template_timeout,
                                          max_chars=config.max_request_body_bytes)
    if state.engine is not None:
        _watch(state, state.engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_load(state, load_engine))
        yield
        task.cancel()
        if state.streams is not None:
            state.streams.close()
        if state.templates is not None:
            state.templates.close()
        if state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown)

    # No Swagger UI / ReDoc: their pages load JavaScript from a CDN on the origin whose chat page
    # keeps the API key. The schema stays at /openapi.json (behind the key when one is set).
    app = FastAPI(title="rillm", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.rillm = state
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(RequestGate, api_keys=config.api_keys,
                       max_body_bytes=config.max_request_body_bytes,
                       hosts=allowed_hosts(config.host, config.allowed_hosts),
                       refuse=_refuse_early(state))
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["*"], allow_headers=["*"])

    # The API key is checked by RequestGate (rillm/server/gate.py), before any body is read,
    # on the routes `gate.guarded` names.

    install_page(app)

    @app.get("/health", response_class=Response, responses=HEALTH_RESPONSES)
    async def health() -> Response:
        if state.engine is not None and state.engine.is_running:
            return Response(status_code=200)
        # No details here (a load error names files): the operator has them on stderr, a client
        # with the key in the 503 of any /v1 request.
        reason = "load failed" if state.load_error else (
            "loading" if state.engine is None else "engine stopped")
        return JSONResponse({"status": reason}, status_code=503)

    state.registry.register(EngineCollector(state))

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus metrics in the text exposition format"}})
    async def metrics() -> Response:
        return Response(metrics_text(state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        max_len = state.engine.max_model_len if state.engine else None
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(state.started), "owned_by": "rillm",
             "root": name, "max_model_len": max_len}
            for name in config.served_model_names
        ]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        state.check_model(model_id)
        return {"id": model_id, "object": "model", "created": int(state.started),
                "owned_by": "rillm", "root": model_id,
                "max_model_len": state.engine.max_model_len if state.engine else None}

    @app.post("/v1/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        from rillm.server.chat import create_chat_completion

        return await _generation(state, request, body.n, lambda engine: create_chat_completion(
            state, engine, body, request))

    @app.post("/v1/responses", responses=GENERATION_RESPONSES)
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        from rillm.server.responses import create_response

        return await _generation(state, request, 1, lambda engine: create_response(
            state, engine, body, request))

    @app.post("/v1/messages", responses=GENERATION_RESPONSES)
    async def messages(body: MessagesRequest, request: Request) -> Response:
        from rillm.server.messages import create_message

        return await _generation(state, request, 1, lambda engine: create_message(
            state, engine, body, request))

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(body: CountTokensRequest) -> dict[str, int]:
        from rillm.server.messages import count_tokens

        return await count_tokens(state, state.ready_engine(), body)

    @app.post("/v1/completions", responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        from rillm.server.completions import create_completion, sequence_count

        return await _generation(state, request, sequence_count(body.prompt, body.n),
                                 lambda engine: create_completion(state, engine, body, request))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        from rillm.server.chat import render_chat
        from rillm.server.chat_output import template_kwargs

        engine = state.ready_engine()
        state.check_model(body.model)
        tokenizer = engine.tokenizer
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            text = await render_chat(
                state, engine, body.messages, body.add_generation_prompt, body.chat_template,
                body.tools, template_kwargs(state.config, body))
            ids = await encode(tokenizer, text, add_special_tokens=False)
        else:
            assert body.prompt is not None  # exactly one of the two, checked above
            ids = await encode(tokenizer, body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        engine = state.ready_engine()
        state.check_model(body.model)
        vocab = engine.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": await decode(engine.tokenizer, body.tokens)}

    return app


def _resume(state: ServerState, request: Request) -> EventStreamResponse | None:
    """A request carrying `Last-Event-ID`, with resumable streams on: the rest of the stream
    it names (its body is not run again), or a 404 once that stream's window has passed."""
    last_event_id = request.headers.get("last-event-id")
    if state.streams is None or last_event_id is None:
        return None
    stream, after = state.streams.resume(last_event_id)
    return EventStreamResponse(stream.read(after, state.config.keepalive_interval), stream)


async def _generation(
    state: ServerState, request: Request, sequences: int,
    handler: Callable[[ServingEngine], Awaitable[Response]],
) -> Response:
    """Admission, counted in sequences: a request is refused (429, Retry-After) when the
    sequences it starts would make more than `max_queued_requests` wait beyond the batch
    (`max_num_seqs`); an idle server admits any request, so a large one can still run alone.
    The check and taking the place are one step (no await between), so a burst cannot pass
    the check together; the place is given back when the response is over (a stream's end,
    however it ends) or the handler fails. A request resuming a stream (Last-Event-ID) takes
    no place: it reads the rest of that stream."""
    if (resumed := _resume(state, request)) is not None:
        return resumed
    engine = state.ready_engine()
    if (busy := _queue_full(state, engine, sequences)) is not None:
        raise busy
    state.num_active += 1
    state.num_sequences += sequences
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            state.num_active -= 1
            state.num_sequences -= sequences

    try:
        response = await handler(engine)
    except BaseException:
        release()
        raise
    if isinstance(response, EventStreamResponse) and response.resumable is not None:
        response.resumable.when_ended(release)  # its place is held while it runs
    elif isinstance(response, EventStreamResponse):
        response.on_close = release
    else:
        release()
    return response


def _queue_full(state: ServerState, engine: ServingEngine, sequences: int) -> APIError | None:
    """The 429 for a request of `sequences` sequences, where it would make more than
    `max_queued_requests` wait beyond the batch; None: admitted."""
    limit = state.config.max_queued_requests
    waiting = state.num_sequences - engine.max_num_seqs
    if limit is None or not state.num_sequences or waiting + sequences <= limit:
        return None
    return APIError(429, f"the server is busy: {max(waiting, 0)} sequences are already "
                    f"waiting (at most {limit}); retry shortly", code="queue_full",
                    headers={"Retry-After": "1"})


def _refuse_early(state: ServerState) -> Callable[[str, str, bool], APIError | None]:
    """For the gate: a generation request's 429 from its head alone, where the queue has no
    room even for one sequence — before its body is read and parsed, which under a burst
    cost more than the refusal (a resumed stream takes no new place)."""

    def refuse(method: str, path: str, resuming: bool) -> APIError | None:
        engine = state.engine
        if method != "POST" or path not in GENERATION_PATHS or resuming \
                or engine is None or not engine.is_running:
            return None
        return _queue_full(state, engine, 1)

    return refuse


async def _load(state: ServerState, load_engine: Callable[[], ServingEngine]) -> None:
    try:
        state.engine = await asyncio.to_thread(load_engine)
    except Exception as exc:  # noqa: BLE001 - reported to the operator, then the server exits
        state.load_error = f"the model failed to load: {exc}"
        logger.debug("model load failed", exc_info=True)
        if state.on_failure is not None:
            state.on_failure(state.load_error)
        return
    _watch(state, state.engine)
    if state.on_ready is not None:
        state.on_ready()


def _watch(state: ServerState, engine: ServingEngine) -> None:
    """The server's hold on its engine: its grammar compile timeout, and a crashed engine ends
    the server (`on_failure`: `rillm serve` then exits 1, so that a supervisor restarts it)
    once every stream has been told; /health answers 503 meanwhile."""

    def died(exc: BaseException) -> None:
        if state.on_failure is not None:
            state.on_failure(f"the engine stopped: {exc!r}; exiting so that it can be restarted")

    engine.on_death = died
    if state.recorder is None:
        state.recorder = RequestMetricsRecorder(state.registry, state.model_name,
                                                engine.max_model_len)
    engine.grammar_compile_timeout = state.config.grammar_compile_timeout
