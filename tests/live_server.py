"""Real `rillm serve` processes on free loopback ports (fixtures in tests/conftest.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Server:
    base_url: str
    """http://127.0.0.1:PORT"""
    process: subprocess.Popen
    api_key: str | None = None
    seen_while_loading: tuple = ()
    """(health status, chat status, chat Retry-After) observed before the model was ready."""
    log_path: str = ""
    """Where the process's stdout and stderr go."""

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, api_key: str | None = None, timeout: float = 180.0
                 ) -> Iterator[Server]:
    port = free_port()
    device = os.environ.get("RILLM_TEST_DEVICE")  # bench/cuda_check.sh: the servers on a GPU
    if device:
        args = (*args, "--device", device)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RILLM_API_KEY", None)
    log = open(f"/tmp/rillm-test-server-{port}.log", "w")  # closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "rillm.cli", "serve", "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base_url = f"http://127.0.0.1:{port}"
    seen: tuple = ()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"rillm serve exited with {process.returncode}; see {log.name}")
            try:
                status = httpx.get(f"{base_url}/health", timeout=2).status_code
                if status == 200:
                    break
                if not seen:
                    chat = httpx.post(f"{base_url}/v1/chat/completions", timeout=5, json={
                        "messages": [{"role": "user", "content": "hi"}]},
                        headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
                    seen = (status, chat.status_code, chat.headers.get("retry-after"))
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"rillm serve not ready after {timeout} s; see {log.name}")
            time.sleep(0.25)
        yield Server(base_url, process, api_key, seen, log.name)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def wait_until_idle(server: Server, timeout: float = 10.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV block is in use."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = read_metrics(server)
        idle = (metrics["rillm:num_requests_running"] == 0
                and metrics["rillm:num_requests_waiting"] == 0
                and metrics["rillm:kv_cache_blocks_in_use"] == 0)
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.1)


def read_metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers(), timeout=5).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] = float(value)
    return values
