"""The abuse suite (bench/abuse.py) in `make test`: every hostile case gets a right answer,
and after each the server is healthy, serves a normal request and holds nothing; at the end
its resident memory is within 1.5x of the start."""

from __future__ import annotations

from bench.abuse import CASES, SERVER_FLAGS, run_all
from tests.live_server import start_server


def test_the_server_survives_the_abuse_suite():
    assert len(CASES) >= 80
    server_gen = start_server(*SERVER_FLAGS)
    server = next(server_gen)
    try:
        report = run_all(server)
    finally:
        server_gen.close()
    assert not report.failures, "\n".join(report.failures)
    assert report.rss_end <= 1.5 * report.rss_start, (report.rss_start, report.rss_end)
