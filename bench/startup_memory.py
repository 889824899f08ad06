"""Start-up time and memory of `rillm serve`: seconds from launch to the first /health 200,
then resident memory (now and peak) after serving a few requests.

    python -m bench.startup_memory [--runs 3] [-- extra serve flags]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import httpx

from tests.live_server import free_port


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    fields = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def one_run(extra: list[str]) -> tuple[float, float, float]:
    port = free_port()
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "rillm.cli", "serve", "--port", str(port),
                                *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                raise SystemExit("the server exited")
            time.sleep(0.05)
        ready = time.perf_counter() - start
        for _ in range(4):
            httpx.post(f"{base}/v1/completions", timeout=120, json={
                "prompt": "Once upon a time " * 30, "max_tokens": 64, "ignore_eos": True})
        rss, peak = rss_mib(process.pid)
        return ready, rss, peak
    finally:
        process.terminate()
        process.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    results = [one_run(extra) for _ in range(args.runs)]
    for ready, rss, peak in results:
        print(f"ready in {ready:.2f} s, RSS {rss:.0f} MiB, peak RSS {peak:.0f} MiB")
    print(f"median: ready {statistics.median(r[0] for r in results):.2f} s, "
          f"RSS {statistics.median(r[1] for r in results):.0f} MiB, "
          f"peak {statistics.median(r[2] for r in results):.0f} MiB  (serve {' '.join(extra)})")


if __name__ == "__main__":
    main()
