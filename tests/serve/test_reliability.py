"""1,000 requests at 16-way concurrency against one `camelid serve` (loopback only, bounded in count), mixing
valid requests, malformed JSON, oversized prompts and bodies, bad parameters, unknown models and clients that
disconnect mid-stream: no crash, no 5xx for a valid request, every malformed one a 4xx, and the server's
memory (RSS) flat within 10% from the 100th request to the last."""

from __future__ import annotations

import json
import random
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import Server, request

N_REQUESTS, CONCURRENCY = 1000, 16


def valid_chat(i: int) -> tuple[str, dict]:
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Tell me about Emma, {i}."}],
                                    "max_tokens": 6, "temperature": 0.8, "seed": i}


def valid_completion(i: int) -> tuple[str, dict]:
    return "/v1/completions", {"prompt": "Mr. Knightley said", "max_tokens": 6, "temperature": 0, "logprobs": 2,
                               "n": 2}


def valid_stream(i: int) -> tuple[str, dict]:
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
                                    "stream": True}


BAD_BODIES = [
    b"{not json",
    b"",
    b"[]",
    json.dumps({"messages": "hello"}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 0}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}).encode(),
    json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "Emma " * 400}]}).encode(),  # longer than the context
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}}).encode(),
    json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 40}).encode(),
    b"x" * (70 << 10),  # over the body limit
]


def disconnect_mid_stream(port: int) -> None:
    body = json.dumps({"prompt": "Emma", "max_tokens": 100, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        seen = b""
        while b"data: " not in seen and len(seen) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            seen += chunk


@pytest.mark.slow
def test_a_thousand_mixed_requests(tiny_model, tmp_path) -> None:  # noqa: ANN001 - fixtures
    server = Server(tiny_model, "--slots", "8", "--ctx", "256", "--max-queue", "64", "--max-body-kb", "64",
                    log=tmp_path / "reliability.log")
    rng = random.Random(0)
    kinds = rng.choices(["chat", "completion", "stream", "bad", "disconnect"], weights=[3, 2, 2, 4, 1],
                        k=N_REQUESTS)
    failures: list[str] = []
    done = 0
    rss: dict[int, float] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal done
        kind = kinds[i]
        try:
            if kind == "disconnect":
                disconnect_mid_stream(server.port)
            elif kind == "bad":
                status, _, body = request(server.url, "POST", "/v1/chat/completions", BAD_BODIES[i % len(BAD_BODIES)])
                if not 400 <= status < 500 or "error" not in json.loads(body):
                    failures.append(f"{i} bad request {i % len(BAD_BODIES)}: {status} {body[:200]!r}")
            else:
                path, body = {"chat": valid_chat, "completion": valid_completion, "stream": valid_stream}[kind](i)
                status, _, raw = request(server.url, "POST", path, body)
                ok = status == 200 and (raw.rstrip().endswith(b"data: [DONE]") if kind == "stream"
                                        else "choices" in json.loads(raw))
                if not ok:
                    failures.append(f"{i} {kind}: {status} {raw[:200]!r}")
        except Exception as e:  # noqa: BLE001 - every kind of failure is reported
            failures.append(f"{i} {kind}: {type(e).__name__}: {e}")
        with lock:
            done += 1
            if done in (100, N_REQUESTS):
                rss[done] = server.rss_mb()

    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, range(N_REQUESTS)))
        assert server.proc.poll() is None, "the server died"
        assert request(server.url, path="/health")[0] == 200
        metrics = request(server.url, path="/metrics")[2].decode()
    finally:
        server.stop()
    assert not failures, failures[:10]
    assert 'status="5' not in metrics
    assert rss[N_REQUESTS] <= rss[100] * 1.10, rss
