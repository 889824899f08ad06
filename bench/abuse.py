"""The abuse suite: hostile requests against a real `rillm serve` on a loopback port, each
followed by the checks a user of the same server would notice — /health answers 200, a normal
request is served, nothing is left running or waiting, no KV block is in use — and at the end
the server's resident memory against its start.

    python -m bench.abuse [--report docs/reliability.md]

tests/server/test_abuse.py runs every case in `make test` (the same `CASES`, the same checks).
Each case says what it sends and which answers are right for it: a 4xx in OpenAI's error
shape for bad input, a 200 for hostile-but-valid input (which must then not hurt anyone else),
a closed connection for a client too slow or too quiet. Nothing here leaves the loopback.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from bench.startup_memory import rss_mib
from tests.live_server import Server, read_metrics, start_server, wait_until_idle

SERVER_FLAGS = ("--header-timeout", "1", "--send-timeout", "2", "--grammar-compile-timeout", "2",
                "--max-num-seqs", "4", "--max-queued-requests", "8", "--max-connections", "64",
                "--keepalive-interval", "1")
"""Short timeouts so that a slow-client case ends in seconds; a small queue so that a burst
meets it."""

USER = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Outcome:
    status: int | None
    """The HTTP status, or None where the server closed the connection without one."""
    body: bytes = b""


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Server], list[Outcome]]
    allowed: frozenset[int | None]
    """Statuses (None: closed without an answer) that are right for this case."""


# --- how a case sends ------------------------------------------------------------------------


def _address(server: Server) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def _read_response(sock: socket.socket) -> Outcome:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return Outcome(None, data)
    head, _, body = data.partition(b"\r\n\r\n")
    return Outcome(int(head.split(b" ", 2)[1]), body)


def raw(payload: bytes, *, rcvbuf: int | None = None, then: Callable[[socket.socket], None]
        | None = None) -> Callable[[Server], list[Outcome]]:
    """Send `payload` on a fresh socket (optionally do more with it), read until closed."""

    def run(server: Server) -> list[Outcome]:
        with socket.socket() as sock:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(60)
            sock.connect(_address(server))
            try:
                sock.sendall(payload)
                if then is not None:
                    then(sock)
            except OSError:
                pass  # the server may close first; what it answered is read below
            return [_read_response(sock)]

    return run


def request(method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            ) -> Callable[[Server], list[Outcome]]:
    def run(server: Server) -> list[Outcome]:
        response = httpx.request(method, server.base_url + path, content=body, timeout=60,
                                 headers={"Content-Type": "application/json", **(headers or {})})
        return [Outcome(response.status_code, response.content)]

    return run


def post(path: str, obj: object, headers: dict | None = None) -> Callable[[Server], list[Outcome]]:
    """`obj` as JSON the way a hostile client may write it: NaN, Infinity and lone surrogate
    escapes included (Python's json writes them)."""
    return request("POST", path, json.dumps(obj).encode(), headers)


def chat(**fields: object) -> Callable[[Server], list[Outcome]]:
    return post("/v1/chat/completions", {"messages": USER, "max_tokens": 4, **fields})


def completion(**fields: object) -> Callable[[Server], list[Outcome]]:
    return post("/v1/completions", {"prompt": "Hi", "max_tokens": 4, **fields})


def burst(count: int, body: dict, path: str = "/v1/completions") -> Callable[[Server],
                                                                               list[Outcome]]:
    """`count` requests released at once."""

    def run(server: Server) -> list[Outcome]:
        barrier = threading.Barrier(count)

        def one(_: int) -> Outcome:
            barrier.wait()
            response = httpx.post(server.base_url + path, json=body, timeout=120)
            return Outcome(response.status_code, response.content)

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(one, range(count)))

    return run


def disconnect_storm(count: int) -> Callable[[Server], list[Outcome]]:
    """`count` long streams, each dropped after its first few events."""

    def run(server: Server) -> list[Outcome]:
        def one(i: int) -> Outcome:
            body = {"prompt": "Tell a story", "max_tokens": 2000, "ignore_eos": True,
                    "stream": True}
            with httpx.stream("POST", f"{server.v1}/completions", json=body, timeout=60) as r:
                if r.status_code != 200:
                    r.read()
                    return Outcome(r.status_code, r.content)
                lines = r.iter_lines()
                for _ in range(i % 5 + 1):
                    next(lines)
                return Outcome(r.status_code)

        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(one, range(count)))

    return run


def unread_stream(server: Server) -> list[Outcome]:
    """A long stream whose client reads nothing: wait until the server has dropped it (its
    place given back), then see what reached the socket."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(60)
        sock.connect(_address(server))
        sock.sendall(_http("POST", "/v1/chat/completions", LONG_STORY))
        deadline = time.monotonic() + 120
        time.sleep(1)
        while read_metrics(server)["rillm:num_http_requests_active"] and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        outcome = _read_response(sock)
        return [Outcome(None if b"data: [DONE]" not in outcome.body else 200)]


def _dribble(sock: socket.socket) -> None:
    for i in range(30):
        sock.sendall(b"X-Slow-%d: x\r\n" % i)
        time.sleep(0.25)


def _stall(sock: socket.socket) -> None:
    time.sleep(0.2)


def _silent(sock: socket.socket) -> None:
    pass


def _http(method: str, path: str, body: bytes = b"", headers: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
            + headers
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


# --- the cases -------------------------------------------------------------------------------

BAD = frozenset({400})
OK = frozenset({200})
OK_OR_BAD = frozenset({200, 400})
LONG_STORY = json.dumps({"messages": [{"role": "user", "content": "Write a long story."}],
                         "max_tokens": 6000, "ignore_eos": True, "stream": True,
                         "logprobs": True, "top_logprobs": 20}).encode()
NESTED_SCHEMA = {"$defs": {"n": {"anyOf": [{"$ref": "#/$defs/n"},
                                           {"type": "array", "items": {"$ref": "#/$defs/n"}}]}},
                 "$ref": "#/$defs/n"}


def _schema(schema: object) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


CASES: list[Case] = [
    # Malformed bodies.
    Case("invalid JSON", request("POST", "/v1/chat/completions", b'{"messages": [}'), BAD),
    Case("truncated JSON", request("POST", "/v1/chat/completions", b'{"messages": [{"ro'), BAD),
    Case("empty body", request("POST", "/v1/chat/completions", b""), BAD),
    Case("body is null", request("POST", "/v1/chat/completions", b"null"), BAD),
    Case("body is an array", request("POST", "/v1/completions", b"[1, 2, 3]"), BAD),
    Case("body is a string", request("POST", "/v1/completions", b'"prompt"'), BAD),
    Case("100,000-deep nested array", request(
        "POST", "/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000
        + b"}"), BAD),
    Case("50,000-deep nested object", request(
        "POST", "/v1/chat/completions", b'{"messages": [], "x": ' + b'{"a": ' * 50_000 + b"1"
        + b"}" * 50_000 + b"}"), BAD),
    Case("5,000-digit integer", request(
        "POST", "/v1/completions", b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}"), BAD),
    Case("invalid UTF-8 bytes", request(
        "POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
        BAD),
    Case("form-encoded body", request("POST", "/v1/completions", b"prompt=hi&max_tokens=3",
                                      {"Content-Type": "application/x-www-form-urlencoded"}),
         BAD),
    Case("unknown field", chat(temperatur=0.5), BAD),
    Case("duplicate keys", request("POST", "/v1/completions",
                                   b'{"prompt": "a", "max_tokens": 2, "max_tokens": -1}'), BAD),
    # Types and ranges.
    Case("max_tokens -1", chat(max_tokens=-1), BAD),
    Case("max_tokens 2**63", chat(max_tokens=2**63), BAD),
    Case("max_tokens as a string", chat(max_tokens="5"), BAD),
    Case("max_tokens as a float", completion(max_tokens=2.5), BAD),
    Case("temperature -1", chat(temperature=-1), BAD),
    Case("temperature Infinity", chat(temperature=float("inf")), BAD),
    Case("temperature NaN", chat(temperature=float("nan")), BAD),
    Case("temperature 1e308", chat(temperature=1e308), OK_OR_BAD),
    Case("top_p 2", chat(top_p=2), BAD),
    Case("top_k -5", completion(top_k=-5), BAD),
    Case("min_p NaN", completion(min_p=float("nan")), BAD),
    Case("repetition_penalty Infinity", completion(repetition_penalty=float("inf")), BAD),
    Case("presence_penalty 1e9", chat(presence_penalty=1e9), BAD),
    Case("n 0", chat(n=0), BAD),
    Case("n 129", chat(n=129), BAD),
    Case("n 10**9", completion(n=10**9), frozenset({400, 429})),
    Case("seed 2**70", chat(seed=2**70), BAD),
    Case("top_logprobs 21", chat(logprobs=True, top_logprobs=21), BAD),
    Case("logprobs 10**6", completion(logprobs=10**6), BAD),
    Case("stop as an object", chat(stop={"a": 1}), BAD),
    Case("messages empty", post("/v1/chat/completions", {"messages": [], "max_tokens": 2}),
         BAD),
    Case("role 'wizard'", post("/v1/chat/completions", {
        "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2}), BAD),
    Case("content part of unknown type", post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": [{"type": "hologram"}]}], "max_tokens": 2}),
         BAD),
    Case("an image part", post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]}],
        "max_tokens": 2}), BAD),
    Case("tool_choice naming no tool", chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "g"}}), BAD),
    Case("tool with a non-object schema", chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": 7}}]), BAD),
    Case("unknown response_format", chat(response_format={"type": "yaml"}), BAD),
    Case("a schema that is not a schema", chat(response_format=_schema({"type": 12})), BAD),
    Case("prompt token id -1", completion(prompt=[-1, 5]), BAD),
    Case("prompt token id past the vocabulary", completion(prompt=[10**9]), BAD),
    Case("empty prompt list", completion(prompt=[]), BAD),
    Case("max_tokens past the context", completion(max_tokens=10**6), BAD),
    Case("detokenize ids past the vocabulary", post("/detokenize", {"tokens": [10**9]}), BAD),
    Case("tokenize with both prompt and messages", post("/tokenize", {"prompt": "a",
                                                                       "messages": USER}), BAD),
    Case("a model that does not exist", chat(model="gpt-9"), frozenset({404})),
    # Unicode.
    Case("a lone surrogate in a message", post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2}), BAD),
    Case("a reversed surrogate pair", completion(prompt="\udc00\ud800"), BAD),
    Case("a lone surrogate in a stop string", chat(stop=["\udfff"]), BAD),
    Case("a lone surrogate in a tool name", chat(tools=[{"type": "function", "function": {
        "name": "\ud800", "parameters": {"type": "object"}}}]), BAD),
    Case("NUL characters", completion(prompt="a\x00b\x00" * 100, stop=["\x00"]), OK),
    Case("right-to-left overrides and zero-width joiners", chat(messages=[{
        "role": "user", "content": "\u202e\u200d\u2066" * 1000}]), OK),
    Case("combining marks, 20,000 on one letter", completion(prompt="a" + "\u0301" * 20_000),
         OK_OR_BAD),
    Case("1 MB of emoji", completion(prompt="\U0001f600" * 250_000, max_tokens=1), OK_OR_BAD),
    Case("1 MB of emoji to /tokenize", post("/tokenize", {"prompt": "\U0001f600" * 250_000}),
         OK),
    Case("a million token ids to /detokenize", post("/detokenize", {"tokens": [5] * 1_000_000}),
         OK),
    # Huge bodies and lists.
    Case("a 9 MiB body", request("POST", "/v1/completions", b'{"prompt": "' + b"a" * (9 << 20)
                                 + b'"}'), frozenset({413})),
    Case("a declared 10 GB body", raw(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"Content-Length: 10000000000\r\n\r\n"),
         frozenset({413})),
    Case("a 9 MiB chunked body", raw(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/json\r\n\r\n"
        + b"".join(b"%x\r\n" % (1 << 20) + b"a" * (1 << 20) + b"\r\n" for _ in range(9))
        + b"0\r\n\r\n"), frozenset({413, None})),
    Case("2,000 messages", post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}] * 2000, "max_tokens": 2}), BAD),
    Case("5,000 prompts", completion(prompt=["hi"] * 5000), BAD),
    Case("1,000 stop strings", chat(stop=["x"] * 1000), BAD),
    Case("a 100,000-character stop string", chat(stop=["x" * 100_000]), BAD),
    Case("10,000 stop_token_ids", completion(stop_token_ids=list(range(10_000))), BAD),
    Case("5,000 logit_bias entries", chat(logit_bias={str(i): 1 for i in range(5000)}), BAD),
    Case("logit_bias of 1e9", chat(logit_bias={"5": 1e9}), BAD),
    Case("a request's own chat_template", chat(chat_template="{{ messages }}"), BAD),
    Case("a 100 KB header", raw(_http("GET", "/health", headers=b"X-Big: " + b"a" * 100_000
                                      + b"\r\n")), frozenset({431, 400})),
    Case("a 100 KB URL", raw(b"GET /v1/models?" + b"a" * 100_000 + b" HTTP/1.1\r\n"
                             b"Host: 127.0.0.1\r\n\r\n"), frozenset({431, 400})),
    # Catastrophic regexes, schemas and grammars.
    Case("regex (a+)+$", chat(structured_outputs={"regex": "(a+)+$"}), OK),
    Case("regex ((a*)*)*b", chat(structured_outputs={"regex": "((a*)*)*b"}), OK_OR_BAD),
    Case("regex a{1000}{1000}", chat(structured_outputs={"regex": "(a{1000}){1000}"}),
         OK_OR_BAD),
    Case("regex with 60,000 alternatives", chat(structured_outputs={
        "regex": "|".join(f"w{i}" for i in range(9000))[:60_000]}), OK_OR_BAD),
    Case("a recursive anyOf/$ref schema", chat(response_format=_schema(NESTED_SCHEMA)),
         OK_OR_BAD),
    Case("a schema nested 2,000 deep", request("POST", "/v1/chat/completions", (
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "response_format": '
        '{"type": "json_schema", "json_schema": {"name": "x", "schema": '
        + '{"type": "array", "items": ' * 2000 + '{"type": "integer"}' + "}" * 2000 + "}}}"
    ).encode()), OK_OR_BAD),
    Case("an enum of 6,000 values", chat(response_format=_schema(
        {"enum": [str(i) for i in range(6000)]})), OK_OR_BAD),
    Case("a schema over the size bound", chat(response_format=_schema(
        {"enum": ["x" * 70_000]})), BAD),
    Case("a left-recursive grammar", chat(structured_outputs={
        "grammar": 'root ::= root "a" | "b"'}), OK_OR_BAD),
    Case("a grammar that does not parse", chat(structured_outputs={"grammar": "root ::= ("}),
         BAD),
    Case("two constraints at once", chat(structured_outputs={"regex": "a", "choice": ["b"]}),
         BAD),
    # Methods, paths, headers.
    Case("GET on a POST route", request("GET", "/v1/chat/completions"), frozenset({405})),
    Case("DELETE /v1/models", request("DELETE", "/v1/models"), frozenset({405})),
    Case("path traversal", request("GET", "/../../etc/passwd"), frozenset({404})),
    Case("a NUL in the path", request("GET", "/v1/models/%00"), frozenset({404})),
    Case("a foreign Host (DNS rebinding)", request("GET", "/v1/models",
                                                   headers={"Host": "evil.example"}), BAD),
    Case("a non-ASCII Authorization", raw(_http("GET", "/v1/models",
                                                headers=b"Authorization: Bearer \xff\xfe\r\n")),
         OK),
    Case("a negative Content-Length", raw(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1"
                                          b"\r\nContent-Length: -5\r\n\r\n"), BAD),
    Case("not HTTP at all", raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 50 + b"\r\n\r\n"),
         frozenset({400, None})),
    # Slow and stalled clients.
    Case("a dribbled header (slowloris)", raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                                              then=_dribble), frozenset({408})),
    Case("a silent connection", raw(b"", then=_silent), frozenset({None})),
    Case("a stalled body", raw(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Length: 100\r\n\r\n{\"prompt\"", then=_stall),
         frozenset({None})),
    Case("a stream nobody reads", unread_stream, frozenset({None})),
    # Bursts.
    Case("a burst of 40 requests on a queue of 8", burst(
        40, {"prompt": "Count:", "max_tokens": 32, "ignore_eos": True}), frozenset({200, 429})),
    Case("a burst of 12 n=8 requests", burst(
        12, {"prompt": "Hi", "max_tokens": 8, "n": 8}), frozenset({200, 429})),
    Case("a disconnect storm of 24 streams", disconnect_storm(24), frozenset({200, 429})),
]


# --- running them ----------------------------------------------------------------------------


def is_openai_error(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str) and "type" in error


def check(case: Case, outcomes: list[Outcome], server: Server) -> list[str]:
    """What is wrong after one case: its answers, then the server as everyone else sees it."""
    problems = []
    for outcome in outcomes:
        if outcome.status not in case.allowed:
            problems.append(f"answered {outcome.status}, expected one of "
                            f"{sorted(case.allowed, key=str)}: {outcome.body[:200]!r}")
        elif outcome.status is not None and outcome.status >= 400 and \
                not is_openai_error(outcome.body):
            problems.append(f"a {outcome.status} not in OpenAI's error shape: "
                            f"{outcome.body[:200]!r}")
    if server.process.poll() is not None:
        return [*problems, f"the server exited with {server.process.returncode}"]
    health = httpx.get(f"{server.base_url}/health", timeout=30)
    if health.status_code != 200:
        problems.append(f"/health then answered {health.status_code}")
    normal = httpx.post(f"{server.v1}/completions", timeout=60,
                        json={"prompt": "The capital of France is", "max_tokens": 3})
    if normal.status_code != 200 or normal.json()["usage"]["completion_tokens"] != 3:
        problems.append(f"a normal request then got {normal.status_code}: {normal.text[:200]}")
    metrics = wait_until_idle(server, timeout=30)
    deadline = time.monotonic() + 30
    while metrics["rillm:num_http_requests_active"] and time.monotonic() < deadline:
        time.sleep(0.1)
        metrics = read_metrics(server)
    for name in ("rillm:num_requests_running", "rillm:num_requests_waiting",
                 "rillm:kv_cache_blocks_in_use", "rillm:num_http_requests_active"):
        if metrics[name]:
            problems.append(f"{name} = {metrics[name]:g} afterwards")
    return problems


@dataclass
class Report:
    results: list[tuple[Case, list[Outcome], list[str], float]]
    rss_start: float
    rss_end: float

    @property
    def failures(self) -> list[str]:
        return [f"{case.name}: {problem}" for case, _, problems, _ in self.results
                for problem in problems]

    @property
    def requests(self) -> int:
        return sum(len(outcomes) for _, outcomes, _, _ in self.results)


def run_all(server: Server, cases: list[Case] = CASES) -> Report:
    # Warm-up first, so the start RSS is the serving process's, not the just-loaded one's.
    for _ in range(3):
        httpx.post(f"{server.v1}/completions", json={"prompt": "Hi", "max_tokens": 8},
                   timeout=60)
    start = rss_mib(server.process.pid)[0]
    results = []
    for case in cases:
        began = time.monotonic()
        try:
            outcomes = case.run(server)
        except Exception as exc:  # noqa: BLE001 - a case that could not even be sent is a failure
            results.append((case, [], [f"raised {exc!r}"], time.monotonic() - began))
            continue
        results.append((case, outcomes, check(case, outcomes, server),
                        time.monotonic() - began))
    return Report(results, start, rss_mib(server.process.pid)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    server_gen = start_server(*SERVER_FLAGS)
    server = next(server_gen)
    try:
        began = time.monotonic()
        report = run_all(server)
        for case, outcomes, problems, seconds in report.results:
            statuses = sorted({str(o.status) for o in outcomes})
            print(f"{'FAIL' if problems else 'ok  '} {seconds:6.2f} s  "
                  f"{'/'.join(statuses):>12}  {case.name}")
            for problem in problems:
                print(f"        {problem}")
        print(f"{len(report.results)} cases, {report.requests} hostile requests, "
              f"{len(report.failures)} failures, {time.monotonic() - began:.0f} s; RSS "
              f"{report.rss_start:.0f} -> {report.rss_end:.0f} MiB "
              f"({report.rss_end / report.rss_start:.2f}x)")
    finally:
        server_gen.close()


if __name__ == "__main__":
    main()
