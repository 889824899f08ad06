"""AsyncEngine: the engine loop in its own thread, seen from asyncio as generate()/abort().

The loop thread owns the LLMEngine; nothing else touches it. Requests and aborts reach it
through a thread-safe inbox; outputs go back to each request's mailbox on the event loop.
A mailbox merges deltas that arrive while its consumer is busy, so a slow client never makes
the engine wait and never loses text. Torch releases the GIL inside kernels, so the event
loop stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from rillm.config import EngineConfig
from rillm.engine.llm_engine import LLMEngine
from rillm.kernels.plan import KernelPlan
from rillm.outputs import RequestOutput, merge_all
from rillm.sampling_params import InvalidParameterError, SamplingParams

logger = logging.getLogger(__name__)

GRAMMAR_COMPILE_TIMEOUT_S = 10.0
"""How long a request's grammar may take to compile before the request is a 400 (the server's
--grammar-compile-timeout)."""


class EngineDeadError(RuntimeError):
    """The engine loop crashed; no request can be served any more."""


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int


_Item = RequestOutput | BaseException


def _put_all(batch: list[tuple[str, _Mailbox, _Item]]) -> None:
    for _, mailbox, item in batch:
        mailbox.put(item)


class _Mailbox:
    """One request's outputs, merged while unread (once, when read: a delta a step appended,
    so a stream nobody reads costs a step O(1), not a re-join of all its text). An error
    replaces whatever is pending. Lives on the event loop thread."""

    def __init__(self) -> None:
        self._pending: list[RequestOutput] = []
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            if self._error is None:
                self._error, self._pending = item, []
        elif self._error is None:
            self._pending.append(item)
        self._ready.set()

    async def get(self) -> RequestOutput | BaseException:
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            error, self._error = self._error, None
            return error
        pending, self._pending = self._pending, []
        assert pending
        return merge_all(pending)


class _DaemonWorker:
    """One daemon thread running submitted calls in order: unlike a ThreadPoolExecutor's, it
    never holds up the process's exit (a grammar compile that runs away cannot be stopped)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple]] = \
            queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the submitter's to handle
                future.set_exception(exc)


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        """`engine`, or a function that builds one: it is then called on the loop thread (and
        this waits for it), so the model is built by the thread that will run it. A CPU model
        built on a thread other than the one stepping it decodes slower (measured on 2 cores:
        28 ms a token against 17), each thread keeping its own OpenMP team."""
        self.engine: LLMEngine
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, _Mailbox]] = {}
        """Request id -> where its outputs go. Touched only by the loop thread."""
        self._stopping = False
        self.error: BaseException | None = None
        self.grammar_compile_timeout = GRAMMAR_COMPILE_TIMEOUT_S
        self._compile_pool = _DaemonWorker("rillm-grammar")
        self.on_death: Callable[[BaseException], None] | None = None
        """Called once, on the loop thread, when the loop crashes (after every waiter has
        heard): the server ends the process so that a supervisor restarts it."""
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        if isinstance(engine, LLMEngine):
            self.engine = engine
            self._built.set()
            build = None
        else:
            build = engine
        self._thread = threading.Thread(target=self._run, args=(build,), name="rillm-engine",
                                        daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(lambda: LLMEngine(config))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # -- what the server may know of the engine: read-only facts, fixed once it is built --

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def chat_template(self) -> str | None:
        return self.engine.chat_template

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    @property
    def max_num_seqs(self) -> int:
        return self.engine.config.max_num_seqs

    @property
    def kernels(self) -> KernelPlan:
        return self.engine.kernels

    async def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> int:
        """The engine's admission checks, for a caller to run once before it answers: the
        resolved max_tokens, to hand to `generate`. Raises InvalidParameterError naming the
        parameter. A structured-outputs grammar compiles off the event loop, on the one
        compile thread (xgrammar's own two threads under it: a burst of schemas queues there
        instead of taking every core), into xgrammar's thread-safe cache; a compile that takes
        over `grammar_compile_timeout` seconds is the request's 400 (it runs on, in the
        background, and lands in the cache)."""
        spec = params.structured_outputs
        if spec is None:
            return self.engine.validate(prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        work = asyncio.wrap_future(
            self._compile_pool.submit(self.engine.validate, prompt_token_ids, params), loop=loop)
        try:
            return await asyncio.wait_for(asyncio.shield(work), self.grammar_compile_timeout)
        except TimeoutError:
            raise InvalidParameterError(
                spec.field, f"took longer than {self.grammar_compile_timeout:g} s to compile"
            ) from None

    def stats(self) -> EngineStats:
        """A snapshot read across threads: good for monitoring, not for decisions."""
        s = self.engine.scheduler
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting),
            num_free_blocks=self.engine.block_manager.num_free_blocks,
            num_blocks=self.engine.block_manager.num_blocks,
            num_preemptions=s.num_preemptions,
        )

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
        max_tokens: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's output deltas until it finishes. `max_tokens`: what
        `validate` returned for this request; None: it is validated here, and
        InvalidParameterError raised before anything is yielded. Leaving the iteration early
        (or cancelling it) aborts the request."""
        if self.error is not None:
            raise EngineDeadError("the engine has stopped") from self.error
        if max_tokens is None:
            max_tokens = await self.validate(prompt_token_ids, params)
        mailbox = _Mailbox()
        loop = asyncio.get_running_loop()
        self._inbox.put(("add", request_id, list(prompt_token_ids), params, prompt, max_tokens,
                         loop, mailbox))
        if self.error is not None:  # it died between the check above and the put
            raise EngineDeadError("the engine has stopped") from self.error
        finished = False
        try:
            while not finished:
                item = await mailbox.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopping = True
        self._inbox.put(("stop",))
        self._thread.join(timeout=30)

    # -- the loop thread ---------------------------------------------------------------------

    def _run(self, build: Callable[[], LLMEngine] | None) -> None:
        if build is not None:
            try:
                self.engine = build()
            except BaseException as exc:  # noqa: BLE001 - raised again by the constructor
                self._build_error = exc
                return
            finally:
                self._built.set()
        try:
            while not self._stopping:
                block = not self.engine.has_unfinished_requests()
                self._drain_inbox(block)
                if self.engine.has_unfinished_requests():
                    self._deliver((o.request_id, o, o.finished) for o in self.engine.step())
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
            logger.exception("engine loop crashed")
            self.error = exc
            dead = EngineDeadError(f"the engine stopped: {exc!r}")
            self._deliver([(request_id, dead, True) for request_id in self._routes])
            self._fail_inbox(dead)
            if self.on_death is not None:
                self.on_death(exc)
        finally:
            self.engine.close()

    def _drain_inbox(self, block: bool) -> None:
        while True:
            try:
                message = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            kind = message[0]
            if kind == "add":
                _, request_id, prompt_ids, params, prompt, max_tokens, loop, mailbox = message
                self._routes[request_id] = (loop, mailbox)
                try:
                    self.engine.add_request(request_id, prompt_ids, params, prompt, max_tokens)
                except Exception as exc:  # noqa: BLE001 - that request's failure, not the loop's
                    if not isinstance(exc, ValueError):
                        logger.exception("request %s could not be added", request_id)
                    self.engine.abort_request(request_id)  # whatever part of it got in
                    self._deliver([(request_id, exc, True)])
            elif kind == "abort":
                self.engine.abort_request(message[1])
                self._routes.pop(message[1], None)
            elif kind == "stop":
                return

    def _fail_inbox(self, error: BaseException) -> None:
        while True:
            try:
                message = self._inbox.get(block=False)
            except queue.Empty:
                return
            if message[0] == "add":
                loop, mailbox = message[6], message[7]
                loop.call_soon_threadsafe(mailbox.put, error)

    def _deliver(
        self, items: Iterable[tuple[str, RequestOutput | BaseException, bool]]
    ) -> None:
        """(request id, output or error, last) items to their mailboxes, one wake-up of each
        event loop for all of them: a wake-up per output (a write to the loop's self-pipe, a
        callback) cost ~5% of a decode step at 8 requests, most of it the engine thread waiting
        for the GIL while the loop ran."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[str, _Mailbox, _Item]]] = {}
        for request_id, item, last in items:
            route = self._routes.pop(request_id, None) if last else self._routes.get(request_id)
            if route is not None:
                batches.setdefault(route[0], []).append((request_id, route[1], item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the callers' event loop is closed
                self.engine.abort_request([request_id for request_id, _, _ in batch])
