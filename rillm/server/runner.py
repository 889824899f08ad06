"""Run the server: uvicorn on the configured address, the model loading beside it with a
progress bar, and one line on stdout once requests can be served."""

from __future__ import annotations

import logging
import signal
import sys
import time

import uvicorn
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from rillm.config import EngineConfig
from rillm.engine.async_engine import AsyncEngine
from rillm.engine.protocol import ServingEngine
from rillm.server.app import ServerState, create_app
from rillm.server.config import ServerConfig
from rillm.server.connections import MAX_HEADER_BYTES, guarded_protocol


def serve(engine_config: EngineConfig, config: ServerConfig, started: float) -> int:
    logging.basicConfig(level=logging.WARNING, format="rillm: %(levelname)s %(message)s")
    if config.enable_log_requests:
        logging.getLogger("rillm.server.generation").setLevel(logging.INFO)
    console = Console(stderr=True)
    progress = Progress(SpinnerColumn(), TextColumn("[bold]loading {task.description}"),
                        BarColumn(), TimeElapsedColumn(), console=console, transient=True)
    task = progress.add_task(config.served_model_names[0], total=None)
    state = ServerState(config)
    server: uvicorn.Server | None = None
    failed: list[str] = []

    def ready() -> None:
        progress.stop()
        if config.data_parallel_size > 1:
            # Ray's core worker took SIGTERM and SIGINT when it started (in the loading
            # thread); uvicorn gets them back, so that a stop shuts the replicas and the local
            # Ray processes down instead of leaving them behind. This runs on the main thread.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.getsignal(sig))
        if state.engine is not None:
            print(f"rillm: kernels: {state.engine.kernels.describe()}", flush=True)
        print(f"rillm: serving {config.served_model_names[0]} at "
              f"http://{config.host}:{config.port}/v1 "
              f"(ready in {time.monotonic() - started:.1f} s)", flush=True)

    def failure(message: str) -> None:
        progress.stop()
        failed.append(message)
        print(f"rillm: error: {message}", file=sys.stderr, flush=True)
        if server is not None:
            server.should_exit = True

    def load() -> ServingEngine:
        progress.update(task, description=config.served_model_names[0])
        if config.data_parallel_size > 1:
            from rillm.distributed.replicas import ReplicatedEngine

            return ReplicatedEngine.start(engine_config, config.data_parallel_size,
                                          config.ray_address, config.routing_policy)
        return AsyncEngine.from_config(engine_config)

    state.on_ready, state.on_failure = ready, failure
    app = create_app(config, load, state)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.uvicorn_log_level,
        timeout_graceful_shutdown=3, access_log=False,
        http=guarded_protocol(config.connections), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    ))
    progress.start()
    try:
        server.run()
    finally:
        progress.stop()
    if failed or not server.started:
        return 1
    return 0
