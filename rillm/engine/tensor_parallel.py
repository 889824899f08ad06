"""Tensor parallelism: one engine, its model split over `--tensor-parallel-size` processes.

Rank 0 is the engine's own process: it schedules, owns the block manager, samples, and before
each model step broadcasts the step's inputs (`StepInputs`: token ids, positions' starts,
block tables — plain lists) to ranks 1..N-1. Every rank then runs the same forward on its
shard (rillm/model/parallel.py) and its own slice of the KV cache (its KV heads), summing
partial outputs with an all-reduce after each row-parallel layer; only rank 0 computes logits.
The ranks are processes started here (spawned, so nothing of the parent's state is shared),
joined by torch.distributed over loopback TCP: gloo on the CPU, nccl on CUDA.

On one small CPU this proves correctness, not speed: the ranks share the same cores and pay
an all-reduce per layer twice.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rillm.config import EngineConfig
from rillm.worker.model_runner import StepInputs

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(days=365)
"""How long a rank waits in a collective. The workers wait for the next step inside one, for
as long as the server stays idle, so no timeout that an idle server could reach: a rank that
dies is noticed otherwise (its peers' sockets close; a worker dies with rank 0)."""


def backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TensorParallelGroup:
    """Rank 0's side: the worker processes and the broadcast of each step to them. One per
    process (torch.distributed's default group is the process's). The ranks are spawned: a
    script that builds a tensor-parallel LLM must guard its entry point with
    `if __name__ == "__main__":`, as multiprocessing requires."""

    def __init__(self, config: EngineConfig, world: int) -> None:
        if dist.is_initialized():
            raise ValueError("one tensor-parallel engine per process: this one has a process "
                             "group already (close() the other engine first)")
        if config.device.startswith("cuda") and torch.cuda.device_count() < world:
            raise ValueError(f"--tensor-parallel-size {world} needs {world} GPUs, one a rank; "
                             f"{torch.cuda.device_count()} are visible")
        self.world = world
        self._closed = False
        self.broken = False
        """A step failed on rank 0 after the workers got it: the ranks are out of step."""
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = torch.multiprocessing.get_context("spawn")
        self.workers = [context.Process(target=worker_main, name=f"rillm-tp{rank}",
                                        args=(config, rank, world, init_method, os.getpid()),
                                        daemon=True)
                        for rank in range(1, world)]
        for worker in self.workers:
            worker.start()
        dist.init_process_group(backend(config.device), init_method=init_method, rank=0,
                                world_size=world, timeout=COLLECTIVE_TIMEOUT)
        atexit.register(self.close)

    def setup(self, num_blocks: int) -> None:
        """Tell the workers how many KV blocks to allocate (decided by rank 0)."""
        dist.broadcast_object_list([num_blocks], src=0)

    def broadcast(self, step: StepInputs) -> None:
        if self.broken:
            raise RuntimeError("the tensor-parallel ranks are out of step after a failed step; "
                               "the engine must be restarted")
        dist.broadcast_object_list([step], src=0)

    def close(self) -> None:
        """Stop the workers (they leave their loop) and the process group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if dist.is_initialized() and not self.broken:
                dist.broadcast_object_list([None], src=0)
        except Exception:  # noqa: BLE001 - a worker already gone: stop the rest below
            logger.warning("tensor-parallel workers did not take the stop message (exit codes "
                           "%s)", [w.exitcode for w in self.workers])
        for worker in self.workers:
            worker.join(timeout=0 if self.broken else 10)
            if worker.is_alive():
                worker.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


def worker_main(config: EngineConfig, rank: int, world: int, init_method: str,
                parent: int) -> None:
    """A rank other than 0: build this rank's shard, then run every step rank 0 broadcasts.
    On CUDA, rank r runs on GPU r."""
    from rillm.engine.llm_engine import build_for_engine, engine_threads
    from rillm.loader import load_model
    from rillm.model.parallel import Shard
    from rillm.worker.model_runner import ModelRunner

    # A Ctrl-C or a service manager's stop reaches the whole process group: rank 0 stops the
    # workers in order (close()); a worker stopping on its own would fail rank 0's collective.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)
    if config.device.startswith("cuda"):
        torch.cuda.set_device(rank)
        config = replace(config, device=f"cuda:{rank}")
    threads = engine_threads(config)
    torch.set_num_threads(threads)
    dist.init_process_group(backend(config.device), init_method=init_method, rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        loaded = load_model(config.model)
        built = build_for_engine(config, loaded, Shard(rank, world))
        setup: list[Any] = [None]
        dist.broadcast_object_list(setup, src=0)
        if setup[0] is None:  # rank 0 failed to build and stopped the group
            return
        runner = ModelRunner(built.model, built.attention, loaded.config, int(setup[0]),
                             config.block_size, built.dtype, built.device, threads,
                             num_kv_heads=built.num_kv_heads)
        del loaded
        while True:
            message: list[Any] = [None]
            dist.broadcast_object_list(message, src=0)
            if message[0] is None:
                break
            runner.run_step(message[0])
    finally:
        dist.destroy_process_group()


def _die_with_parent(parent: int) -> None:
    """Linux: this worker gets SIGKILL when the thread that started it ends (the engine's loop
    thread, which lives as long as the engine), however it ends."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl: go too
            os._exit(1)
    except OSError:
        pass
