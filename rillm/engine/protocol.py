"""ServingEngine: what the server uses of an engine. `AsyncEngine` (one engine in this process)
and `rillm.distributed.replicas.ReplicatedEngine` (several, on Ray Serve) both are one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from rillm.engine.async_engine import EngineStats
from rillm.kernels.plan import KernelPlan
from rillm.outputs import RequestOutput
from rillm.sampling_params import SamplingParams


class ServingEngine(Protocol):
    error: BaseException | None
    on_death: Callable[[BaseException], None] | None
    grammar_compile_timeout: float

    @property
    def is_running(self) -> bool: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def chat_template(self) -> str | None: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_num_seqs(self) -> int: ...

    @property
    def kernels(self) -> KernelPlan: ...

    async def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> int: ...

    def stats(self) -> EngineStats: ...

    def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str,
                 prompt: str | None = None, max_tokens: int | None = None,
                 ) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def shutdown(self) -> None: ...
