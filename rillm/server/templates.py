"""Rendering a chat template: the server's own in this process, a request's own in a sandbox.

A request's `chat_template` (only on a server started with --trust-request-chat-template) is
code the server has never seen. Jinja's sandbox stops attribute tricks, but not work: nested
`range(100000)` loops spin a core for hours and a string doubled forty times asks for a
terabyte, and a thread can be neither stopped nor bounded in memory. So such a template runs in
a worker process of its own, started on first use: bounded in memory (RLIMIT_DATA), in time
(killed, and started afresh for the next one), in output length, and at a lower priority. One
render runs at a time; the next waits its turn.

The server's own template (the model's, or --chat-template) is the operator's and renders
here, on a thread once the messages are long.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import resource
import signal
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from rillm.server.errors import APIError

RENDER_TIMEOUT = 10.0
"""Seconds a request's own template may take to render; then the worker is killed and the
request gets a 400."""
RENDER_MEMORY_BYTES = 1 << 30
"""Memory a request's own template may allocate beyond the worker's own (1 GiB)."""
WORKER_START_TIMEOUT = 120.0
"""Seconds the worker may take to start (a Python with transformers and the tokenizer)."""


class TemplateRejected(Exception):
    """The template failed on these messages; the message says how."""


@dataclass(frozen=True)
class TemplateJob:
    """One rendering: everything apply_chat_template is given, as plain data (it crosses
    into the sandbox worker)."""

    conversation: list[dict[str, Any]]
    template: str
    add_generation_prompt: bool
    tools: list[dict[str, Any]] | None
    kwargs: dict[str, Any]

    def render(self, tokenizer: Any) -> str:
        """The prompt text; TemplateRejected where the template fails on these messages."""
        import jinja2

        try:
            text = tokenizer.apply_chat_template(
                self.conversation, chat_template=self.template, tokenize=False,
                add_generation_prompt=self.add_generation_prompt, tools=self.tools,
                **self.kwargs)
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            raise TemplateRejected(str(exc)) from None
        return str(text)


def rejected(message: str) -> APIError:
    return APIError(400, f"the chat template rejected these messages: {message}",
                    param="messages")


class TemplateSandbox:
    """Renders requests' own templates in a worker process, one at a time, each within
    `timeout` seconds, `memory_bytes` of new memory and `max_chars` of output."""

    def __init__(self, timeout: float = RENDER_TIMEOUT,
                 memory_bytes: int = RENDER_MEMORY_BYTES, max_chars: int = 8 << 20) -> None:
        self.timeout = timeout
        self.memory_bytes = memory_bytes
        self.max_chars = max_chars
        self._turn = asyncio.Lock()
        self._guard = threading.Lock()  # the process handle, against close() from shutdown
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None

    async def render(self, tokenizer: Any, job: TemplateJob) -> str:
        async with self._turn:
            return await asyncio.to_thread(self._exchange, tokenizer, job)

    def close(self) -> None:
        with self._guard:
            self._stop()

    def _exchange(self, tokenizer: Any, job: TemplateJob) -> str:
        conn = self._worker(tokenizer)
        conn.send(job)
        if not conn.poll(self.timeout):
            self.close()  # the only way to stop a render: a fresh worker for the next one
            raise APIError(400, f"the request's chat_template did not render within "
                           f"{self.timeout:g} s", param="chat_template",
                           code="chat_template_timeout")
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):
            self.close()
            raise APIError(400, "the request's chat_template ended its sandbox (memory or "
                           "recursion)", param="chat_template") from None
        if kind == "text":
            return str(value)
        if kind == "too_long":
            raise APIError(400, f"the request's chat_template rendered {value} characters; at "
                           f"most {self.max_chars} are allowed", param="chat_template")
        if kind == "memory":
            self.close()
            raise APIError(400, f"the request's chat_template needed more than "
                           f"{self.memory_bytes >> 20} MiB", param="chat_template")
        raise rejected(str(value))

    def _worker(self, tokenizer: Any) -> Connection:
        with self._guard:
            if self._process is not None and self._process.is_alive() and self._conn is not None:
                return self._conn
            self._stop()
            context = multiprocessing.get_context("spawn")
            parent, child = context.Pipe()
            process = context.Process(
                target=_serve, args=(child, tokenizer, self.memory_bytes, self.max_chars),
                name="rillm-template-sandbox", daemon=True)
            process.start()
            child.close()
            if not parent.poll(WORKER_START_TIMEOUT) or parent.recv() != "ready":
                process.kill()
                raise APIError(503, "the chat template sandbox did not start",
                               headers={"Retry-After": "5"})
            self._process, self._conn = process, parent
            return parent

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None


def _serve(conn: Connection, tokenizer: Any, memory_bytes: int, max_chars: int) -> None:
    """The worker: bounds itself, then renders jobs until its parent goes away."""
    _die_with_parent()
    os.nice(5)  # a spinning template slows the engine less
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = _data_bytes() + memory_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        try:
            text = job.render(tokenizer)
            reply = ("too_long", len(text)) if len(text) > max_chars else ("text", text)
        except MemoryError:
            conn.send(("memory", None))
            return  # a worker that ran out of memory may be in no state to go on
        except TemplateRejected as exc:
            reply = ("rejected", str(exc))
        except Exception as exc:  # noqa: BLE001 - the request's template, failing its own way
            reply = ("rejected", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


def _data_bytes() -> int:
    """This process's data segment now (what RLIMIT_DATA counts; Linux's /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmData line")


def _die_with_parent() -> None:
    """A worker outlives no server, even one killed mid-render (Linux's PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
