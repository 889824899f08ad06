"""ServerConfig: the HTTP side's settings, frozen once in cli.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rillm.parsers.reasoning import REASONING_PARSERS
from rillm.parsers.tool_calls import TOOL_CALL_PARSERS
from rillm.server.connections import ConnectionLimits

DEFAULT_MAX_QUEUED = 256
"""--max-queued-requests: sequences that may wait beyond the batch before a 429 (four of the
CPU's default batches, one of CUDA's; Ollama's queue holds 512 requests)."""

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
"""--max-request-body-bytes: 8 MiB, some 2 million tokens of text or ~1 million token ids."""


REASONING_FIELDS = {"reasoning": ("reasoning",), "reasoning_content": ("reasoning_content",),
                    "both": ("reasoning", "reasoning_content")}
"""--reasoning-field: the chat message / delta fields that carry the thinking (vLLM's name
now, llama.cpp's and DeepSeek's, or both)."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    """The names clients may use; the first is the one /v1/models reports."""
    api_keys: tuple[str, ...] = ()
    """Any of these opens the guarded routes; empty: no key needed."""
    stream_interval: int = 1
    """Tokens one streamed event carries at most (per-request override: stream_interval)."""
    allowed_origins: tuple[str, ...] = ()
    """CORS origins; empty: CORS off."""
    max_queued_requests: int | None = DEFAULT_MAX_QUEUED
    """Sequences allowed to wait beyond max_num_seqs before new requests get a 429; None:
    no bound (the offline-style setting, for tests and trusted batch jobs)."""
    chat_template: str | None = None
    """Overrides the model's chat template."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names answered besides the loopback ones, on a loopback --host (a reverse proxy's
    public name); any name is answered on another --host."""
    grammar_compile_timeout: float = 10.0
    """Seconds a request's structured-outputs grammar may take to compile (then a 400)."""
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """A body over this is a 413, refused before it is read (rillm/server/gate.py)."""
    trust_request_chat_template: bool = False
    """Whether a request may bring its own `chat_template` (it runs on the server; vLLM's
    flag of the same name). Off: such a request is a 400."""
    chat_template_timeout: float = 10.0
    """Seconds a request's own chat template may take to render (in its sandbox process,
    rillm/server/templates.py); then a 400."""
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    """Open connections, header / body and send timeouts (rillm/server/connections.py)."""
    stream_resume_window: float = 0.0
    """Seconds a stream outlives a broken connection, resumable with Last-Event-ID
    (rillm/server/resume.py); 0: off, a disconnect aborts at once."""
    keepalive_interval: float = 10.0
    """Seconds without an event after which a stream gets a `: keep-alive` comment."""
    uvicorn_log_level: str = "warning"
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    """What a request leaves unset takes these (a model's generation_config.json:
    temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens)."""
    enable_log_requests: bool = False
    """One log line per request once it has ended (ids, token counts, finish, timings)."""
    reasoning_parser: str | None = None
    """deepseek_r1 or qwen3: thinking goes to `reasoning`, the answer to `content`."""
    reasoning_field: str = "reasoning"
    """Which field carries the thinking: reasoning, reasoning_content or both."""
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    """hermes or llama3_json: how tool_choice "auto" finds calls in the model's output."""
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Passed to the chat template under each request's own chat_template_kwargs."""
    data_parallel_size: int = 1
    """Engine replicas; above 1 they run on Ray Serve (rillm.distributed.replicas)."""
    routing_policy: str = "prefix"
    """How the replicas share requests: prefix (a prompt goes where its prefix is cached,
    within the balance threshold) or least-loaded."""
    ray_address: str | None = None
    """An existing Ray cluster to run the replicas on; None: a local Ray instance (or the
    cluster RAY_ADDRESS names)."""

    def __post_init__(self) -> None:
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"--reasoning-parser must be one of {', '.join(REASONING_PARSERS)}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSERS)}")
        if self.reasoning_field not in REASONING_FIELDS:
            raise ValueError(f"--reasoning-field must be one of {', '.join(REASONING_FIELDS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be at least 1")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be non-negative")
        if self.max_request_body_bytes < 1024:
            raise ValueError("max_request_body_bytes must be at least 1024")
        if self.grammar_compile_timeout <= 0:
            raise ValueError("grammar_compile_timeout must be positive")
        if self.chat_template_timeout <= 0:
            raise ValueError("chat_template_timeout must be positive")
        if self.stream_resume_window < 0:
            raise ValueError("stream_resume_window must not be negative")
        if self.routing_policy not in ("prefix", "least-loaded"):
            raise ValueError("--routing-policy must be prefix or least-loaded")
        if self.data_parallel_size < 1:
            raise ValueError("--data-parallel-size must be at least 1")
        if self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be positive")
