"""Bad input gets OpenAI's error shape and a 4xx, before any byte of a stream."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from tests.live_server import read_metrics, wait_until_idle

OK_MESSAGES = [{"role": "user", "content": "Hi"}]


def post(server, path, body=None, content=None, headers=None):
    if body is not None:
        # Python's own JSON: Infinity / NaN and \\uXXXX escapes for any string, as a careless
        # client writes them (httpx's json= refuses both).
        content = json.dumps(body).encode()
        headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(f"{server.v1}{path}", content=content,
                      headers={**server.headers(), **(headers or {})}, timeout=60)


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("body, param", [
    ({"messages": OK_MESSAGES, "temperature": -1}, "temperature"),
    ({"messages": OK_MESSAGES, "top_p": 2}, "top_p"),
    ({"messages": OK_MESSAGES, "n": 0}, "n"),
    ({"messages": OK_MESSAGES, "n": 100_000}, "n"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0.type"),
    ({"messages": OK_MESSAGES, "seed": 10**30}, "seed"),
    ({"messages": OK_MESSAGES, "top_k": -5}, "top_k"),
    ({"messages": OK_MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": OK_MESSAGES, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"messages": OK_MESSAGES, "stop": [""]}, "stop"),
    ({"messages": OK_MESSAGES, "temperature": "hot"}, "temperature"),
    ({"messages": OK_MESSAGES, "stream": "yes"}, "stream"),
    ({"messages": OK_MESSAGES, "frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": OK_MESSAGES, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": OK_MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
    # Non-finite numbers (Python's JSON writes and reads Infinity and NaN).
    ({"messages": OK_MESSAGES, "temperature": float("inf")}, "temperature"),
    ({"messages": OK_MESSAGES, "repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"messages": OK_MESSAGES, "presence_penalty": float("nan")}, "presence_penalty"),
    ({"messages": OK_MESSAGES, "min_p": float("nan")}, "min_p"),
    # What a request may make every step carry.
    ({"messages": OK_MESSAGES, "stop": [f"s{i}" for i in range(33)]}, "stop"),
    ({"messages": OK_MESSAGES, "stop": "x" * 1025}, "stop"),
    ({"messages": OK_MESSAGES, "stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"messages": OK_MESSAGES, "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    # Lone UTF-16 surrogates: valid JSON, not Unicode text.
    ({"messages": [{"role": "user", "content": "hi \ud800 there"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00\ud800"}]}]},
     "messages.0.content.0.text"),
    ({"messages": OK_MESSAGES, "stop": ["ok", "\ud83d"]}, "stop.1"),
    ({"messages": OK_MESSAGES, "chat_template_kwargs": {"k": ["\ud800"]}},
     "chat_template_kwargs"),
])
def test_invalid_chat_requests_are_400_naming_the_param(server, body, param):
    for stream in (False, True) if param != "stream_options" else (False,):
        response = post(server, "/chat/completions",
                        {**body, "stream": body.get("stream", stream)})
        assert_error(response, 400, param=param)


@pytest.mark.parametrize("prompt", ["caf\u00e9 \ud800", ["fine", "\udfff"]])
def test_a_completion_prompt_with_a_lone_surrogate_is_400(server, prompt):
    # Sent as the raw JSON escape a client's encoder writes for a broken string.
    content = json.dumps({"prompt": prompt, "max_tokens": 2})
    response = post(server, "/completions", content=content.encode(),
                    headers={"content-type": "application/json"})
    assert "surrogate" in assert_error(response, 400)["message"]
    assert post(server, "/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_request_template_needs_the_operators_flag(server):
    """A template in the request runs on the server (loops, huge strings): refused unless the
    server was started with --trust-request-chat-template (tests/server/test_known_model_server
    and the reasoning server run with it)."""
    template = "{% for i in range(10**6) %}{% for j in range(10**6) %}x{% endfor %}{% endfor %}"
    for url in (f"{server.v1}/chat/completions", f"{server.base_url}/tokenize"):
        response = httpx.post(url, json={"messages": OK_MESSAGES, "chat_template": template},
                              headers=server.headers(), timeout=60)
        error = assert_error(response, 400, param="chat_template")
        assert "--trust-request-chat-template" in error["message"]
    assert post(server, "/chat/completions",
                {"messages": OK_MESSAGES, "max_tokens": 2}).status_code == 200


def test_a_prompt_list_times_n_is_bounded(server):
    """At most 1024 sequences a request (prompts in the list x n), checked before any of them
    is tokenized or queued."""
    response = post(server, "/completions", {"prompt": ["a"] * 9, "n": 128, "max_tokens": 1})
    assert "1024" in assert_error(response, 400, param="prompt")["message"]
    response = post(server, "/completions", {"prompt": [[5, 6]] * 2000, "max_tokens": 1})
    assert_error(response, 400, param="prompt")
    reply = post(server, "/completions", {"prompt": ["a", "b"], "n": 3, "max_tokens": 1})
    assert reply.status_code == 200 and len(reply.json()["choices"]) == 6


def test_a_huge_prompt_is_tokenized_off_the_event_loop(server):
    """4 MiB of text takes seconds to tokenize: meanwhile the server keeps answering (before,
    /health waited for the whole of it). The prompt is then over the context: a 400."""
    prompt = "The quick brown fox jumps over the lazy dog. " * (4 * 1024 * 1024 // 45)
    finished = []

    def send():
        response = post(server, "/completions", {"prompt": prompt, "max_tokens": 1})
        finished.append((time.monotonic(), response))

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.3)  # the body is up and being tokenized
    answered = []
    while sender.is_alive() and len(answered) < 20:
        start = time.monotonic()
        assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200
        answered.append((start, time.monotonic() - start))
        time.sleep(0.05)
    sender.join()
    done_at, response = finished[0]
    assert_error(response, 400, param="prompt")
    during = [took for start, took in answered if start < done_at - 0.2]
    assert during, "the prompt was tokenized too fast to observe"
    assert max(during) < 1.0, during


def test_a_body_that_is_not_an_object_is_400(server):
    for content in (b"[1, 2]", b'"hi"', b"null"):
        response = post(server, "/chat/completions", content=content,
                        headers={"content-type": "application/json"})
        assert "JSON object" in assert_error(response, 400)["message"]


def test_invalid_json_is_400(server):
    response = post(server, "/chat/completions", content=b'{"messages": [',
                    headers={"content-type": "application/json"})
    assert_error(response, 400, code="invalid_json")


def test_context_length_exceeded(server):
    long_text = "word " * 9000
    for body in ({"messages": [{"role": "user", "content": long_text}]},
                 {"messages": OK_MESSAGES, "max_tokens": 9000, "stream": True}):
        assert_error(post(server, "/chat/completions", body), 400,
                     code="context_length_exceeded")
    assert_error(post(server, "/completions", {"prompt": "hi", "max_tokens": 100_000}), 400,
                 code="context_length_exceeded", param="max_tokens")


def test_unknown_model_is_404(server):
    error = assert_error(post(server, "/chat/completions",
                              {"model": "gpt-17", "messages": OK_MESSAGES}), 404,
                         param="model", code="model_not_found")
    assert "gpt-17" in error["message"]
    with pytest.raises(openai.NotFoundError):
        OpenAI(api_key="x", base_url=server.v1).completions.create(model="nope", prompt="hi")


def test_unknown_route_and_method_keep_the_shape(server):
    assert_error(httpx.get(f"{server.v1}/nowhere", timeout=10), 404)
    assert_error(httpx.get(f"{server.v1}/chat/completions", timeout=10), 405)


def test_sdk_raises_bad_request_with_the_message(server):
    client = OpenAI(api_key="EMPTY", base_url=server.v1)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=OK_MESSAGES,
                                       temperature=-3, stream=True)
    assert "temperature" in str(err.value)


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
    ("GET", "/v1/models/house-model"),
])
def test_api_key_is_required_on_every_v1_route(guarded_server, method, path):
    url = guarded_server.base_url + path
    body = {"model": "house-model", "messages": OK_MESSAGES, "prompt": "hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        response = httpx.request(method, url, json=body if method == "POST" else None,
                                 headers=headers, timeout=30)
        assert_error(response, 401, code="invalid_api_key")
    assert httpx.get(f"{guarded_server.base_url}/health", timeout=10).status_code == 200


def test_a_non_ascii_key_is_401_not_500(guarded_server):
    url = guarded_server.v1 + "/models"
    sent = ("Bearer s\u00e9same".encode("latin-1"), b"Bearer \xff\xfe", "Bearer \u00e9".encode())
    for raw in sent:
        response = httpx.get(url, headers=[(b"authorization", raw)], timeout=30)
        assert_error(response, 401, code="invalid_api_key")


def raw_request(server, head: str, timeout: float = 10) -> bytes:
    """Send request headers alone (a body announced but never sent) and read the answer: one
    the server gives before reading the body."""
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_no_key_no_body_read(guarded_server):
    """The key is checked before the body: a 10 GB body announced without a key is a 401 at
    once (the server would otherwise wait for it)."""
    answer = raw_request(guarded_server, "POST /v1/chat/completions HTTP/1.1\r\n"
                         "Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         "Content-Length: 10000000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401") and b"invalid_api_key" in answer


def test_a_body_over_the_bound_is_413_before_it_is_read(server):
    answer = raw_request(server, "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         "Content-Type: application/json\r\nContent-Length: 9000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer


def test_a_chunked_body_is_cut_off_at_the_bound(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(9):
            yield b"x" * (1024 * 1024)
        yield b'", "max_tokens": 1}'

    response = httpx.post(f"{server.v1}/completions", content=chunks(), timeout=60,
                          headers={"content-type": "application/json"})
    assert_error(response, 413, code="body_too_large")
    assert post(server, "/completions", {"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_metrics_and_schema_need_the_key_and_there_is_no_swagger_page(guarded_server):
    base = guarded_server.base_url
    for path in ("/metrics", "/openapi.json"):
        assert_error(httpx.get(base + path, timeout=10), 401, code="invalid_api_key")
        assert httpx.get(base + path, headers=guarded_server.headers(),
                         timeout=10).status_code == 200
    for path in ("/docs", "/redoc"):
        assert httpx.get(base + path, headers=guarded_server.headers(),
                         timeout=10).status_code == 404
    assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_a_loopback_server_answers_only_loopback_host_names(server):
    """DNS rebinding: a page at evil.example re-pointed at 127.0.0.1 sends its own name."""
    port = server.base_url.rsplit(":", 1)[1]
    url = server.v1 + "/models"
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.2.nip.io"):
        response = httpx.get(url, headers={"Host": host}, timeout=10)
        assert_error(response, 400, code="host_not_allowed")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(url, headers={"Host": host}, timeout=10).status_code == 200


def test_sdk_with_the_key_and_a_served_name(guarded_server):
    client = OpenAI(api_key="sesame", base_url=guarded_server.v1)
    assert [m.id for m in client.models.list().data] == ["house-model", "smol"]
    reply = client.chat.completions.create(model="smol", messages=OK_MESSAGES, max_tokens=2)
    assert reply.model == "smol"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(api_key="wrong", base_url=guarded_server.v1).models.list()
    # Either of the server's keys (--api-key sesame open-sesame); no prefix or part of one.
    assert OpenAI(api_key="open-sesame", base_url=guarded_server.v1).models.list().data
    for partial in ("open", "sesame open-sesame", "open-sesame2"):
        with pytest.raises(openai.AuthenticationError):
            OpenAI(api_key=partial, base_url=guarded_server.v1).models.list()


def test_full_queue_answers_429_with_retry_after(guarded_server):
    # Long enough that the queue stays full while the third request is sent, however fast the
    # engine decodes (~6 ms a token here).
    body = {"model": "house-model", "prompt": "Count:", "max_tokens": 400, "ignore_eos": True}
    statuses: list[int] = []

    def send():
        statuses.append(post(guarded_server, "/completions", body).status_code)

    threads = [threading.Thread(target=send) for _ in range(2)]  # one runs, one waits
    for t in threads:
        t.start()
    try:
        deadline = 50
        while deadline and httpx.get(f"{guarded_server.base_url}/metrics", timeout=5,
                                     headers=guarded_server.headers()).text.find(
                "rillm:num_http_requests_active 2.0") < 0:
            deadline -= 1
            threading.Event().wait(0.1)
        response = post(guarded_server, "/completions", body)
        error = assert_error(response, 429)
        assert response.headers["retry-after"]
        assert "busy" in error["message"]
    finally:
        for t in threads:
            t.join()
    assert statuses == [200, 200]
    wait_until_idle(guarded_server)


def test_a_full_queue_refuses_before_reading_the_body(guarded_server):
    """Under a burst the refusals must be cheap: with no room for even one sequence, the 429
    answers from the request's head, before its body is read (a body never sent here)."""
    long = {"model": "house-model", "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True,
            "stream": True}
    url = f"{guarded_server.v1}/completions"
    host, port = guarded_server.base_url.removeprefix("http://").split(":")
    with httpx.stream("POST", url, json=long, timeout=120, headers=guarded_server.headers()
                      ) as running, httpx.stream("POST", url, json=long, timeout=120,
                                                 headers=guarded_server.headers()) as waiting:
        assert running.status_code == waiting.status_code == 200
        for key, status in (("sesame", 429), ("wrong", 401)):
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             f"Authorization: Bearer {key}\r\nContent-Type: application/json"
                             f"\r\nContent-Length: 1000\r\n\r\n".encode())
                started = time.monotonic()
                head = sock.recv(65536)
                assert time.monotonic() - started < 2  # the header timeout is 10 s
                assert head.startswith(f"HTTP/1.1 {status} ".encode()), head[:200]
                if status == 429:
                    assert b"\r\nretry-after: 1\r\n" in head.lower()
    wait_until_idle(guarded_server)


def test_the_queue_bound_counts_sequences_not_requests(guarded_server):
    """One running + one waiting, in sequences: while one request runs, an n=3 request (or
    three prompts) would put 3 in the queue: a 429. On an idle server it runs alone."""
    long = {"model": "house-model", "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{guarded_server.v1}/completions", json=long, timeout=120,
                      headers=guarded_server.headers()) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)
        assert read_metrics(guarded_server)["rillm:num_requests_running"] == 1
        wide = post(guarded_server, "/completions", {"model": "house-model", "prompt": "Hi",
                                                     "max_tokens": 1, "n": 3})
        assert assert_error(wide, 429)["code"] == "queue_full"
        listed = post(guarded_server, "/completions", {"model": "house-model",
                                                       "prompt": ["a", "b", "c"],
                                                       "max_tokens": 1})
        assert listed.status_code == 429
        with httpx.stream("POST", f"{guarded_server.v1}/completions", timeout=120,
                          headers=guarded_server.headers(),
                          json={"model": "house-model", "prompt": "Hi", "max_tokens": 1,
                                "stream": True}) as one:
            assert one.status_code == 200  # one sequence fits the one waiting place
            running.close()  # the long stream is aborted, the waiting one runs
            assert one.read().endswith(b"data: [DONE]\n\n")
    wait_until_idle(guarded_server)
    alone = post(guarded_server, "/completions", {"model": "house-model", "prompt": "Hi",
                                                  "max_tokens": 1, "n": 3})
    assert alone.status_code == 200
    assert len(alone.json()["choices"]) == 3


def test_a_burst_of_streams_cannot_pass_the_queue_bound_together(guarded_server):
    """One running + one waiting: of 8 streams sent at once, exactly 2 are admitted; the
    place is taken at the check itself, not when the stream's body starts."""
    body = {"model": "house-model", "prompt": "Count:", "max_tokens": 64, "ignore_eos": True,
            "stream": True}
    statuses: list[int] = []
    barrier = threading.Barrier(8)

    def send():
        barrier.wait()
        with httpx.stream("POST", f"{guarded_server.v1}/completions", json=body, timeout=120,
                          headers=guarded_server.headers()) as response:
            statuses.append(response.status_code)
            response.read()

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 200] + [429] * 6, statuses
    wait_until_idle(guarded_server)
    assert read_metrics(guarded_server)["rillm:num_http_requests_active"] == 0


def test_cors_allows_only_the_configured_origin(guarded_server):
    ok = httpx.options(f"{guarded_server.v1}/chat/completions", timeout=10, headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST"})
    assert ok.headers.get("access-control-allow-origin") == "http://example.com"
    bad = httpx.options(f"{guarded_server.v1}/chat/completions", timeout=10, headers={
        "Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in bad.headers
