"""LLMEngine: the synchronous engine. One `step()` = schedule -> run -> postprocess.

It owns the model runner, the scheduler and one detokenizer per choice, and turns each
step's new tokens into `RequestOutput` deltas. A request with n > 1 becomes n sequences that
share the prompt's KV blocks through the prefix cache; their deltas come back under the
parent request id with the choice `index`.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from rillm.arch_config import ModelArchConfig
from rillm.attention import PagedAttention
from rillm.config import EngineConfig
from rillm.core.block_manager import BlockManager
from rillm.core.request import Request, RequestStatus
from rillm.core.scheduler import Scheduler, SchedulerConfig
from rillm.engine.detokenizer import IncrementalDetokenizer
from rillm.engine.grammar import GrammarCompiler
from rillm.engine.tensor_parallel import TensorParallelGroup
from rillm.kernels.plan import DecodeAttention, KernelPlan, resolve_kernels
from rillm.loader import LoadedModel, load_model
from rillm.loader.gguf_blocks import SUPPORTED_TYPES
from rillm.model.builder import CausalLM, build_model
from rillm.model.parallel import WHOLE, Shard
from rillm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from rillm.sampling_params import InvalidParameterError, SamplingParams
from rillm.worker.decode_graphs import StaticDecode
from rillm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Choice:
    index: int
    request: Request
    detokenizer: IncrementalDetokenizer


@dataclass(slots=True)
class _Parent:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    prompt: str | None
    choices: dict[str, _Choice] = field(default_factory=dict)
    """Scheduler request id -> choice."""
    num_finished: int = 0
    arrived: float = field(default_factory=time.monotonic)
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float = 0.0
    gaps: list[float] = field(default_factory=list)

    def timed(self, now: float) -> None:
        """A step gave this request tokens at `now`."""
        if self.first_token is None:
            self.first_token = now
        else:
            self.gaps.append(now - self.last_token)
        self.last_token = now

    def metrics(self) -> RequestMetrics:
        assert self.first_token is not None
        scheduled = self.scheduled if self.scheduled is not None else self.first_token
        return RequestMetrics(scheduled - self.arrived, self.first_token - self.arrived,
                              self.last_token - self.arrived, tuple(self.gaps))


@dataclass
class EngineModel:
    """What `build_for_engine` builds: one rank's model and how it runs."""

    model: CausalLM
    attention: PagedAttention
    plan: KernelPlan
    dtype: torch.dtype
    device: torch.device
    num_kv_heads: int
    """KV heads this rank's cache holds (all of them without tensor parallelism)."""


def engine_threads(config: EngineConfig) -> int:
    """Torch threads of one rank: every core, shared by the tensor-parallel ranks."""
    return config.num_threads or max(1, available_cores() // config.tensor_parallel_size)


def build_for_engine(config: EngineConfig, loaded: LoadedModel, shard: Shard = WHOLE
                     ) -> EngineModel:
    """The model for `config` from a loaded checkpoint: dtype, kernels, attention backends,
    and the rank `shard` of it. Every tensor-parallel rank builds its own the same way."""
    device = torch.device(config.device)
    quantized = loaded.quantized if config.keep_gguf_quantization else {}
    if config.quantization == "gguf" and not quantized:
        raise ValueError("quantization gguf needs a GGUF file with matrices in a block format "
                         f"rillm keeps ({', '.join(SUPPORTED_TYPES)}); "
                         f"{loaded.path} has none")
    dtype = config.model_dtype(bool(quantized))
    arch = loaded.config
    plan = resolve_kernels(device, dtype, arch.head_dim, bool(quantized), config.cpu_kernels,
                           fusable_layers=not (arch.qk_norm or arch.attention_bias
                                               or arch.architecture == "gemma3"
                                               or shard.parallel))
    attention = PagedAttention.for_plan(plan, config.block_size, dtype, device,
                                        arch.sliding_window)
    model = build_model(arch, loaded.weights, dtype, device, plan, attention, quantized, shard)
    _, (k0, k1) = shard.heads(arch.num_attention_heads, arch.num_key_value_heads)
    return EngineModel(model, attention, plan, dtype, device, k1 - k0)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        threads = engine_threads(config)
        torch.set_num_threads(threads)  # loading runs on them too
        world = config.tensor_parallel_size
        self.group: TensorParallelGroup | None = None
        if world > 1:  # the other ranks load and build while this one does
            # They load the file this engine was given, whichever way it was given.
            workers = config if loaded is None else replace(config, model=loaded.path)
            self.group = TensorParallelGroup(workers, world)
        try:
            self._build(config, loaded, threads, world)
        except BaseException:
            self.close()  # the workers stop (they were waiting for the KV block count)
            raise

    def _build(self, config: EngineConfig, loaded: LoadedModel | None, threads: int,
               world: int) -> None:
        loaded = loaded if loaded is not None else load_model(config.model)
        self.model_path = loaded.path
        self.model_config: ModelArchConfig = loaded.config
        self.tokenizer = loaded.tokenizer
        self.chat_template = loaded.chat_template
        requested = torch.device(config.device)
        if requested.type == "cuda" and requested.index:
            # Triton launches and graph captures go to the thread's current device; the
            # engine builds and steps in one thread (AsyncEngine's loop).
            torch.cuda.set_device(requested)
        built = build_for_engine(config, loaded, Shard(0, world))
        model, attention, plan = built.model, built.attention, built.plan
        device, self.dtype = built.device, built.dtype
        self.kernels: KernelPlan = replace(plan,
                                           fused_decode=model.model.fused_decode is not None)
        """What this engine runs (logged once, at start-up)."""
        if plan.fused_decode and not self.kernels.fused_decode:
            logger.warning("fused decode layers are off: some layer's matrices are not all on "
                           "gguf_linear (mixed block types?), so decode steps run layer by "
                           "layer")
        logger.info("rillm: kernels: %s", self.kernels.describe())

        num_blocks = config.num_kv_blocks or self._blocks_for_space(config)
        capacity = num_blocks * config.block_size
        self.max_model_len = self._resolve_max_model_len(config, capacity)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len
            ),
            self.block_manager,
        )
        if self.group is not None:
            self.group.setup(num_blocks)
        static = None
        if (device.type == "cuda" and plan.decode is DecodeAttention.TRITON
                and not config.enforce_eager and self.group is None):
            static = StaticDecode(config.max_num_seqs,
                                  -(-self.max_model_len // config.block_size))
        self.runner = ModelRunner(
            model, attention, loaded.config, num_blocks, config.block_size, self.dtype, device,
            threads if device.type == "cpu" else None, plan.argmax,
            num_kv_heads=built.num_kv_heads, group=self.group, static_decode=static,
        )
        if self.runner.graphs is not None:
            try:
                self.runner.graphs.capture()
            except Exception:  # a GPU or driver the capture fails on still serves, eagerly
                logger.exception("rillm: capturing CUDA graphs failed; decode steps run "
                                 "eagerly (slower; --enforce-eager skips the attempt)")
                self.runner.graphs = None
        self.grammars = GrammarCompiler(
            self.tokenizer, loaded.config.vocab_size, loaded.config.eos_token_ids
        )
        self._parents: dict[str, _Parent] = {}
        self._choice_parent: dict[str, _Parent] = {}
        self._rng = random.Random(config.seed)
        self._arrival = itertools.count()
        del loaded, model
        _return_freed_memory()

    # -- admission -------------------------------------------------------------------------

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> int:
        """Check a request against the model; returns its resolved max_tokens.
        Raises InvalidParameterError naming the offending parameter."""
        vocab = self.model_config.vocab_size
        if not prompt_token_ids:
            raise InvalidParameterError("prompt", "the prompt is empty")
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidParameterError("prompt", f"token ids must be in [0, {vocab})")
        num_prompt, limit = len(prompt_token_ids), self.max_model_len
        room = limit - num_prompt
        if room < 1:
            raise InvalidParameterError(
                "prompt", f"This model's maximum context length is {limit} tokens, but the "
                f"prompt has {num_prompt} tokens, leaving no room for a completion.",
                code="context_length_exceeded")
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidParameterError(
                "max_tokens", f"This model's maximum context length is {limit} tokens. However, "
                f"you requested {num_prompt + params.max_tokens} tokens ({num_prompt} in the "
                f"prompt, {params.max_tokens} for the completion). Please reduce the prompt or "
                "max_tokens.", code="context_length_exceeded")
        if params.min_tokens > room:
            raise InvalidParameterError("min_tokens", f"must be at most {room} for this prompt")
        for name, ids in (("logit_bias", params.logit_bias or {}),
                          ("stop_token_ids", params.stop_token_ids or ())):
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidParameterError(name, f"token ids must be in [0, {vocab})")
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)
        return params.max_tokens if params.max_tokens is not None else room

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        prompt: str | None = None,
        max_tokens: int | None = None,
    ) -> None:
        """Queue a request. `max_tokens`: what `validate` returned for it, where the caller
        has validated it already (the async engine, before a response starts); None:
        validated here."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if max_tokens is None:
            max_tokens = self.validate(prompt_token_ids, params)
        prompt_ids = list(prompt_token_ids)
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        parent = _Parent(request_id, tuple(prompt_ids), prompt)
        arrival = next(self._arrival)
        for index in range(params.n):
            request = Request(
                request_id=f"{request_id}#{index}",
                prompt_token_ids=prompt_ids,
                params=params,
                max_tokens=max_tokens,
                seed=base_seed + index,
                eos_token_ids=frozenset(self.model_config.eos_token_ids),
                arrival=arrival,
                constraint=(self.grammars.matcher(params.structured_outputs)
                            if params.structured_outputs is not None else None),
            )
            detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params)
            parent.choices[request.request_id] = _Choice(index, request, detokenizer)
        for choice_id, choice in parent.choices.items():
            self.scheduler.add(choice.request)
            self._choice_parent[choice_id] = parent
        self._parents[request_id] = parent

    def abort_request(self, request_ids: Sequence[str] | str) -> None:
        """End requests now and free their KV blocks. Unknown ids are ignored."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            parent = self._parents.pop(request_id, None)
            if parent is None:
                continue
            self.scheduler.finish(parent.choices, RequestStatus.FINISHED_ABORTED)
            for choice_id in parent.choices:
                self._choice_parent.pop(choice_id, None)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent; also done at exit)."""
        if self.group is not None:
            self.group.close()

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._parents)

    # -- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        now = time.monotonic()
        for item in scheduled.scheduled:
            parent = self._choice_parent[item.request.request_id]
            if parent.scheduled is None:
                parent.scheduled = now
        result = self.runner.execute(scheduled.scheduled)
        logprobs = {
            s.request.request_id: lp
            for s, lp in zip(scheduled.scheduled, result.logprobs, strict=True)
        }
        updated = self.scheduler.update(scheduled, result.sampled_token_ids)
        return self._postprocess(updated, logprobs)

    def _postprocess(
        self, updated: list[Request], logprobs: dict[str, Logprob | None]
    ) -> list[RequestOutput]:
        deltas: dict[str, list[CompletionOutput]] = {}
        for request in updated:
            parent = self._choice_parent[request.request_id]
            choice = parent.choices[request.request_id]
            deltas.setdefault(parent.request_id, []).append(
                self._choice_delta(choice, logprobs.get(request.request_id))
            )
        outputs = []
        now = time.monotonic()
        for parent_id, completions in deltas.items():
            parent = self._parents[parent_id]
            parent.timed(now)
            parent.num_finished += sum(1 for c in completions if c.finished)
            finished = parent.num_finished == len(parent.choices)
            if finished:
                del self._parents[parent_id]
                for choice_id in parent.choices:
                    del self._choice_parent[choice_id]
            outputs.append(
                RequestOutput(
                    request_id=parent_id,
                    prompt_token_ids=parent.prompt_token_ids,
                    outputs=tuple(completions),
                    finished=finished,
                    prompt=parent.prompt,
                    num_cached_tokens=min(
                        c.request.num_cached_tokens for c in parent.choices.values()
                    ),
                    metrics=parent.metrics() if finished else None,
                )
            )
        return outputs

    def _choice_delta(self, choice: _Choice, logprob: Logprob | None) -> CompletionOutput:
        request = choice.request
        token_id = request.output_token_ids[-1]
        if request.constraint is not None:
            self._advance_constraint(request, token_id)
        finished = request.is_finished
        # The EOS or stop token that ended a choice is not part of its text.
        hide_last = (
            request.status is RequestStatus.FINISHED_STOPPED
            and not request.params.include_stop_str_in_output
        )
        delta = choice.detokenizer.update([] if hide_last else [token_id], finished=finished)
        if delta.stop_string is not None:
            if finished:  # it also hit max_tokens or EOS; the stop string explains the end
                request.status = RequestStatus.FINISHED_STOPPED
            else:
                self.scheduler.finish([request.request_id], RequestStatus.FINISHED_STOPPED)
            request.stop_reason = delta.stop_string
        return CompletionOutput(
            index=choice.index,
            text=delta.text,
            token_ids=(token_id,),
            logprobs=(logprob,) if logprob is not None else None,
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
        )

    def _advance_constraint(self, request: Request, token_id: int) -> None:
        """Feed the sampled token to the request's grammar; a complete grammar ends it."""
        assert request.constraint is not None
        if not request.constraint.accept(token_id):
            # The mask allowed only what the grammar accepts; this is a bug, not bad input.
            logger.error("request %s: token %d violates its grammar; stopping it",
                         request.request_id, token_id)
        elif not request.constraint.is_terminated:
            return
        if not request.is_finished:
            self.scheduler.finish([request.request_id], RequestStatus.FINISHED_STOPPED)

    # -- sizing ------------------------------------------------------------------------------

    def _blocks_for_space(self, config: EngineConfig) -> int:
        """On the CPU, `kv_cache_space_gib`; on CUDA, what `gpu_memory_utilization` of the
        card leaves once the model is loaded (vLLM's rule: the card's total times the fraction,
        less what is in use)."""
        arch = self.model_config
        bytes_per_token = (
            2 * arch.num_hidden_layers * arch.num_key_value_heads * arch.head_dim
            * torch.empty((), dtype=self.dtype).element_size()
        )
        bytes_per_block = bytes_per_token * config.block_size
        device = torch.device(config.device)
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            return blocks_for_gpu(free, total, config.gpu_memory_utilization, bytes_per_block)
        space = int(config.kv_cache_space_gib * 2**30)
        return max(1, space // bytes_per_block)

    def _resolve_max_model_len(self, config: EngineConfig, capacity: int) -> int:
        model_len = self.model_config.max_position_embeddings
        if config.max_model_len is None:
            if capacity < model_len:
                logger.info(
                    "max_model_len set to %d tokens, what the KV cache holds (the model allows "
                    "%d; raise kv_cache_space_gib for more)", capacity, model_len,
                )
            return min(model_len, capacity)
        if config.max_model_len > model_len:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's context length "
                f"{model_len}"
            )
        if config.max_model_len > capacity:
            raise ValueError(
                f"max_model_len {config.max_model_len} does not fit in the KV cache "
                f"({capacity} tokens); raise kv_cache_space_gib or lower max_model_len"
            )
        return config.max_model_len


def blocks_for_gpu(free: int, total: int, utilization: float, bytes_per_block: int) -> int:
    """KV blocks that fit in `utilization` of a card of `total` bytes of which `free` are free
    (the rest: the model, the CUDA context, other processes). At least one block; an error
    where the fraction is used up already."""
    budget = int(total * utilization) - (total - free)
    if budget < bytes_per_block:
        raise ValueError(
            f"--gpu-memory-utilization {utilization:g} leaves no room for the KV cache: "
            f"{(total - free) / 2**30:.1f} of the card's {total / 2**30:.1f} GiB are in use "
            f"already (the model, the CUDA context, other processes); raise it or free memory")
    return budget // bytes_per_block


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def _return_freed_memory() -> None:
    """Hand the loader's freed buffers (the dequantized checkpoint, packing temporaries) back
    to the OS. glibc keeps freed heap memory mapped, which after a load leaves ~450 MB of the
    default model's resident memory unused; malloc_trim releases it. A no-op elsewhere."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
