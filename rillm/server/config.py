"""ServerConfig: the HTTP side's settings, frozen once in cli.py."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    """The names clients may use; the first is the one /v1/models reports."""
    api_key: str | None = None
    stream_interval: int = 1
    """Tokens one streamed event carries at most (per-request override: stream_interval)."""
    allowed_origins: tuple[str, ...] = ()
    """CORS origins; empty: CORS off."""
    max_queued_requests: int | None = None
    """Requests allowed to wait beyond max_num_seqs before new ones get a 429."""
    chat_template: str | None = None
    """Overrides the model's chat template."""
    keepalive_interval: float = 10.0
    """Seconds without an event after which a stream gets a `: keep-alive` comment."""
    uvicorn_log_level: str = "warning"

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError("stream_interval must be at least 1")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be non-negative")
        if self.keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be positive")
