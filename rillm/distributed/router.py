"""Ray Serve's request-router hook for rillm's replicas: `PrefixAwareRequestRouter` ranks the
candidate replicas of each request with the board's policy (rillm.distributed.routing).

It runs in the server's process, on Ray Serve's router loop. Ray Serve pickles this module by
value to ship the class, so it keeps no state of its own at module level: the board is looked
up by name, at run time, in rillm.distributed.replicas.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

logger = logging.getLogger(__name__)


class PrefixAwareRequestRouter(RequestRouter):
    """Ray Serve's router hook, running in the server's process: ranks the candidates with
    the board's policy. Requests without prefix hashes (none today) fall back to load."""

    def initialize_state(self, **kwargs: Any) -> None:
        # Imported here, at run time: Ray Serve pickles this module by value, and a module
        # global would be a copy; the import finds the board the server process holds.
        from rillm.distributed.replicas import BOARDS

        self.board = BOARDS[kwargs["board"]]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        hashes = _prefix_hashes(pending_request)
        # A replica whose engine loop died stays up until its health checks fail: not while
        # another can serve.
        alive = [r for r in candidate_replicas if (r.routing_stats or {}).get("alive", True)]
        candidate_replicas = alive or candidate_replicas
        by_id: dict[Any, RunningReplica] = {r.replica_id: r for r in candidate_replicas}
        ranked = self.board.policy.rank(hashes, self.board.loads(candidate_replicas))
        request_id = _request_id(pending_request)
        if ranked and request_id is not None:
            # Counted now, not when Ray Serve reports it sent: requests routed at the same
            # moment must see each other's load.
            self.board.place(request_id, ranked[0], hashes)
        return [[by_id[replica_id]] for replica_id in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any,
                          result: Any) -> None:
        request_id = _request_id(pending_request)
        if request_id is not None:  # where it went, if not the first choice
            self.board.place(request_id, replica_id, _prefix_hashes(pending_request))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.board.update(replicas)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        logger.warning("rillm: engine replica %s died; its requests failed, Ray Serve "
                       "replaces it", replica_id)
        self.board.died(replica_id)


def _prefix_hashes(pending_request: PendingRequest | None) -> list[int]:
    if pending_request is None:
        return []
    return list(pending_request.kwargs.get("prefix_hashes", ()))


def _request_id(pending_request: PendingRequest | None) -> str | None:
    """The engine's request id: EngineReplica.generate's third argument (other calls, such as
    validate, are not requests the board counts)."""
    if (pending_request is None or len(pending_request.args) < 3
            or getattr(pending_request.metadata, "call_method", None) != "generate"):
        return None
    return str(pending_request.args[2])
