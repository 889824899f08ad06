"""Data parallelism on Ray Serve: N engine replicas behind rillm's own server.

    rillm serve --data-parallel-size N [--ray-address ADDRESS]

The server process stays what it is (FastAPI/uvicorn: tokenizing, templates, validation,
streaming, errors, the gate); only its engine changes. `ReplicatedEngine` has the interface
the server uses of `AsyncEngine` and forwards each request over a Ray Serve deployment handle
to one of N `EngineReplica`s, each an `AsyncEngine` in its own Ray actor (its own process, its
share of the cores). Which replica serves a request is decided in this process, by
`rillm.distributed.router.PrefixAwareRequestRouter` (Ray Serve's request-router extension
point) with the pure policy
in `rillm.distributed.routing`: the replica most likely to hold the prompt's prefix blocks,
unless that would unbalance the load.

Replicas report their load (running / waiting sequences, free KV blocks, prefix-cache
counters) through Ray Serve's `record_routing_stats`; the router keeps the latest report of
every live replica on `BOARD`, which `/metrics` and `/health` read. A replica that dies fails
the requests it was serving (each gets an error event); Ray Serve starts a new one in its
place, and the others go on serving.

Ray is an optional extra (`pip install 'rillm[ray]'`); nothing imports this module unless
--data-parallel-size is above 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import RequestCancelledError
from ray.serve.request_router import RunningReplica

from rillm.config import EngineConfig
from rillm.core.block_manager import prefix_block_hashes
from rillm.distributed.routing import DEFAULT_BALANCE_THRESHOLD, PrefixAffinityPolicy, ReplicaLoad
from rillm.engine.async_engine import AsyncEngine, EngineDeadError, EngineStats
from rillm.kernels.plan import KernelPlan
from rillm.outputs import RequestOutput
from rillm.sampling_params import InvalidParameterError, SamplingParams

logger = logging.getLogger(__name__)

APP_PREFIX = "rillm"
"""Each server's Ray Serve application is `rillm-<8 hex>`: several servers may share a cluster,
each with its own replicas."""
DEPLOYMENT_NAME = "rillm-engine"
STATS_PERIOD_S = 0.5
"""How often Ray Serve asks each replica for its load (record_routing_stats)."""
ENDED_REMEMBERED = 65536
"""Ended request ids the board remembers (a placement that comes later is ignored)."""
MAX_ONGOING_PER_REPLICA = 4096
"""Ray Serve's own admission bound per replica; the server's gate and the engine's queue are
the real bounds (--max-num-seqs, --max-queued-requests), so this one never bites first."""


@dataclass(frozen=True)
class ReplicaInfo:
    """What the server needs to know of the engine, fixed once it is built (the same on
    every replica: they load the same model with the same settings)."""

    tokenizer: Any
    chat_template: str | None
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    block_size: int
    kernels: KernelPlan


class EngineReplica:
    """One engine in one Ray Serve replica (a Ray actor process)."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = AsyncEngine.from_config(config)
        self.requests_started = 0

    def info(self) -> ReplicaInfo:
        e = self.engine
        return ReplicaInfo(e.tokenizer, e.chat_template, e.max_model_len, e.vocab_size,
                           e.max_num_seqs, e.engine.config.block_size, e.kernels)

    async def validate(self, prompt_token_ids: list[int], params: SamplingParams,
                       compile_timeout: float) -> int:
        self.engine.grammar_compile_timeout = compile_timeout
        return await self.engine.validate(prompt_token_ids, params)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, prompt: str | None, max_tokens: int | None,
                       compile_timeout: float, prefix_hashes: Sequence[int] = ()
                       ) -> AsyncIterator[RequestOutput]:
        """`prefix_hashes` is for the router only (it reads them off the pending request)."""
        self.requests_started += 1
        if params.structured_outputs is not None:
            # The server validated on some replica, maybe not this one: compile the grammar
            # here too, off the engine's loop and within the timeout (a cache hit otherwise),
            # so that the engine never compiles it in the middle of a step.
            await self.validate(prompt_token_ids, params, compile_timeout)
        # Cancelling this generator (the client went away) aborts the request in the engine.
        async for output in self.engine.generate(prompt_token_ids, params, request_id, prompt,
                                                 max_tokens):
            yield output

    def record_routing_stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        blocks = self.engine.engine.block_manager
        return {"running": stats.num_running, "waiting": stats.num_waiting,
                "free_blocks": stats.num_free_blocks, "num_blocks": stats.num_blocks,
                "preemptions": stats.num_preemptions, "requests": self.requests_started,
                "prefix_query_tokens": blocks.num_prefix_queries,
                "prefix_hit_tokens": blocks.num_prefix_hits, "pid": os.getpid(),
                "alive": self.engine.is_running}

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if not self.engine.is_running:
            raise RuntimeError("the engine loop has stopped") from self.engine.error

    def __del__(self) -> None:
        self.engine.shutdown()


class ReplicaBoard:
    """What this process knows of the replicas: the router writes (on Ray Serve's router
    loop), the server reads (/metrics, /health, stats()). One per process and deployment;
    the router finds it by the deployment's name."""

    def __init__(self, balance_threshold: int, prefix_aware: bool = True) -> None:
        self.policy = PrefixAffinityPolicy(balance_threshold, prefix_aware)
        self._lock = threading.Lock()
        self._replicas: dict[Any, RunningReplica] = {}
        self._in_flight: dict[Any, int] = {}
        self._placed: dict[str, Any] = {}
        """Request id -> the replica serving it, until the server says it ended."""
        self._ended: OrderedDict[str, None] = OrderedDict()
        """Requests that ended, maybe before the router placed them (a client that left
        while Ray Serve was routing): a late placement must not count them."""
        self.deaths = 0

    def update(self, replicas: Sequence[RunningReplica]) -> None:
        """Ray Serve's current set of replicas. One that left it died (replicas leave
        otherwise only when the server stops, and then nobody reads the count)."""
        with self._lock:
            current = {r.replica_id: r for r in replicas}
            for gone in set(self._replicas) - set(current):
                self.deaths += 1
                self.policy.forget(gone)
                self._in_flight.pop(gone, None)
            self._replicas = current
            for replica_id in current:
                self._in_flight.setdefault(replica_id, 0)

    def died(self, replica_id: Any) -> None:
        """The router saw the replica's actor die (before Ray Serve's next update)."""
        with self._lock:
            if self._replicas.pop(replica_id, None) is not None:
                self.deaths += 1
            self.policy.forget(replica_id)
            self._in_flight.pop(replica_id, None)

    def loads(self, candidates: Sequence[RunningReplica]) -> dict[Any, ReplicaLoad]:
        with self._lock:
            loads = {}
            for r in candidates:
                stats = r.routing_stats or {}
                loads[r.replica_id] = ReplicaLoad(
                    in_flight=self._in_flight.get(r.replica_id, 0),
                    free_blocks=int(stats.get("free_blocks", 0)),
                    num_blocks=int(stats.get("num_blocks", 0)))
            return loads

    def place(self, request_id: str, replica_id: Any, hashes: Sequence[int]) -> None:
        """The router chose `replica_id` for the request (counted at once, so that requests
        routed at the same moment see it; chosen again elsewhere, it moves)."""
        with self._lock:
            previous = self._placed.get(request_id)
            if previous == replica_id or request_id in self._ended:
                return
            if previous in self._in_flight:
                self._in_flight[previous] = max(0, self._in_flight[previous] - 1)
            self._placed[request_id] = replica_id
            self._in_flight[replica_id] = self._in_flight.get(replica_id, 0) + 1
            replica = self._replicas.get(replica_id)
            num_blocks = int((replica.routing_stats or {}).get("num_blocks", 0)) if replica else 0
            self.policy.routed(replica_id, hashes, num_blocks)

    def finished(self, request_id: str) -> None:
        with self._lock:
            self._ended[request_id] = None
            while len(self._ended) > ENDED_REMEMBERED:
                self._ended.popitem(last=False)
            replica_id = self._placed.pop(request_id, None)
            if replica_id in self._in_flight:
                self._in_flight[replica_id] = max(0, self._in_flight[replica_id] - 1)

    def reports(self) -> dict[str, dict[str, Any]]:
        """Each live replica's last load report, by a short name (its replica id)."""
        with self._lock:
            return {str(getattr(rid, "unique_id", rid)): {**(r.routing_stats or {}),
                                                         "in_flight": self._in_flight.get(rid, 0)}
                    for rid, r in self._replicas.items()}


BOARDS: dict[str, ReplicaBoard] = {}


class ReplicatedEngine:
    """The server's engine when there are several: `AsyncEngine`'s interface over Ray Serve."""

    def __init__(self, handle: Any, info: ReplicaInfo, board: ReplicaBoard, num_replicas: int,
                 started_ray: bool, app_name: str) -> None:
        self.handle = handle
        self.app_name = app_name
        self.info = info
        self.board = board
        self.num_replicas = num_replicas
        self._started_ray = started_ray
        self._streams: dict[str, Any] = {}
        self._stopped = False
        self.error: BaseException | None = None
        self.on_death: Callable[[BaseException], None] | None = None
        """Unused: one replica's death is not the engine's (Ray Serve replaces it)."""
        self.grammar_compile_timeout = 10.0

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def start(cls, config: EngineConfig, num_replicas: int, ray_address: str | None = None,
              routing_policy: str = "prefix") -> ReplicatedEngine:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        # No address: a Ray instance of our own ("local"), not whatever cluster ray.init would
        # find by itself; RAY_ADDRESS still names one to join.
        address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
        started_ray = not ray.is_initialized() and address == "local"
        cores = len(os.sched_getaffinity(0))
        threads = config.num_threads or max(1, cores // num_replicas)
        if not ray.is_initialized():
            ray.init(address=address, namespace="rillm", include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False,
                     num_cpus=max(cores, num_replicas * threads) if started_ray else None,
                     configure_logging=False)
        replica_config = replace(config, num_threads=threads)
        app_name = f"{APP_PREFIX}-{uuid.uuid4().hex[:8]}"
        board = BOARDS.setdefault(app_name, ReplicaBoard(
            DEFAULT_BALANCE_THRESHOLD, prefix_aware=routing_policy == "prefix"))
        serve.start(http_options={"location": "NoServer"})
        router: dict[str, Any] = {
            "request_router_class": "rillm.distributed.router:PrefixAwareRequestRouter",
            "request_router_kwargs": {"board": app_name},
            "request_routing_stats_period_s": STATS_PERIOD_S,
            "request_routing_stats_timeout_s": 5,
        }
        deployment: Any = serve.deployment(EngineReplica)
        deployment = deployment.options(
            name=DEPLOYMENT_NAME, num_replicas=num_replicas,
            ray_actor_options={"num_cpus": threads,
                               "num_gpus": 1 if config.device.startswith("cuda") else 0},
            max_ongoing_requests=MAX_ONGOING_PER_REPLICA,
            health_check_period_s=2, health_check_timeout_s=30,
            graceful_shutdown_timeout_s=5,
            request_router_config=RequestRouterConfig(**router),
        )
        handle = serve.run(deployment.bind(replica_config), name=app_name, route_prefix=None,
                           blocking=False)
        info = handle.info.remote().result(timeout_s=600)
        return cls(handle, info, board, num_replicas, started_ray, app_name)

    # -- what the server may know: AsyncEngine's read-only facts ------------------------------

    @property
    def is_running(self) -> bool:
        return not self._stopped and any(
            report.get("alive", True) for report in self.board.reports().values())

    @property
    def tokenizer(self) -> Any:
        return self.info.tokenizer

    @property
    def chat_template(self) -> str | None:
        return self.info.chat_template

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.info.vocab_size

    @property
    def max_num_seqs(self) -> int:
        """All replicas together: what the server's queue bound is measured against."""
        live = len(self.board.reports()) or self.num_replicas
        return self.info.max_num_seqs * live

    @property
    def kernels(self) -> KernelPlan:
        return self.info.kernels

    def stats(self) -> EngineStats:
        reports = [r for r in self.board.reports().values() if r.get("num_blocks")]
        if not reports:  # nothing reported yet: nothing in use (not a full cache)
            return EngineStats(0, 0, 1, 1, 0)
        return EngineStats(
            num_running=sum(int(r.get("running", 0)) for r in reports),
            num_waiting=sum(int(r.get("waiting", 0)) for r in reports),
            num_free_blocks=sum(int(r.get("free_blocks", 0)) for r in reports),
            num_blocks=sum(int(r.get("num_blocks", 0)) for r in reports),
            num_preemptions=sum(int(r.get("preemptions", 0)) for r in reports))

    def replica_reports(self) -> dict[str, dict[str, Any]]:
        return self.board.reports()

    # -- requests ------------------------------------------------------------------------------

    async def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> int:
        """On any replica (they are alike); its InvalidParameterError is raised here."""
        try:
            return await self.handle.validate.remote(list(prompt_token_ids), params,
                                                     self.grammar_compile_timeout)
        except RayTaskError as exc:
            raise _cause(exc) from None

    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                       request_id: str, prompt: str | None = None,
                       max_tokens: int | None = None) -> AsyncIterator[RequestOutput]:
        if self._stopped:
            raise EngineDeadError("the engine has stopped")
        ids = list(prompt_token_ids)
        hashes = prefix_block_hashes(ids, self.info.block_size)
        stream = self.handle.options(stream=True).generate.remote(
            ids, params, request_id, prompt, max_tokens, self.grammar_compile_timeout,
            prefix_hashes=hashes)
        self._streams[request_id] = stream
        finished = False
        try:
            async for output in stream:
                finished = output.finished
                yield output
        except RequestCancelledError:
            cancelling = getattr(asyncio.current_task(), "cancelling", None)  # 3.11+
            if cancelling is not None and cancelling():
                raise asyncio.CancelledError from None  # as AsyncEngine: the cancel goes on
            return  # abort() was called: the consumer no longer wants it
        except RayTaskError as exc:
            raise _cause(exc) from None
        except RayActorError as exc:
            raise EngineDeadError("the engine replica serving this request died") from exc
        finally:
            self._streams.pop(request_id, None)
            self.board.finished(request_id)
            if not finished:
                stream.cancel()  # the replica's generator is cancelled: the engine aborts

    def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.cancel()

    def shutdown(self) -> None:
        self._stopped = True
        try:
            serve.delete(self.app_name)
            if self._started_ray:
                serve.shutdown()
                ray.shutdown()
        except Exception:  # noqa: BLE001 - shutting down anyway
            logger.exception("rillm: stopping the Ray Serve replicas failed")


def _cause(exc: RayTaskError) -> BaseException:
    """The replica's own exception (an InvalidParameterError stays one: a 400, not a 500)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, InvalidParameterError | EngineDeadError):
        return cause
    return exc
