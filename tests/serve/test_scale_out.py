"""Two `camelid serve` replicas behind a tiny round-robin TCP balancer (what an ordinary load balancer does):
the server keeps no state between requests, so any replica answers any request, a conversation may move from one
to the other between turns, and the answers are the ones a single server gives."""

from __future__ import annotations

import asyncio
import itertools
import re
import threading
from collections.abc import Iterator

import openai
import pytest
from serve_helpers import Server, request


class RoundRobin:
    """Each new TCP connection goes to the next backend; bytes are piped both ways (loopback only)."""

    def __init__(self, ports: list[int]) -> None:
        self.backends = itertools.cycle(ports)
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", next(self.backends))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    def close(self) -> None:
        self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def replicas(tiny_model, tmp_path_factory) -> Iterator[list[Server]]:  # noqa: ANN001 - fixtures
    logs = tmp_path_factory.mktemp("replicas")
    servers = []
    try:
        for i in range(2):  # started together, then waited for
            servers.append(Server(tiny_model, "--slots", "2", "--ctx", "256", "--served-model-name", "tiny",
                                  log=logs / f"replica{i}.log", wait=False))
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


def served_requests(server: Server) -> int:
    text = request(server.url, path="/metrics")[2].decode()
    return sum(int(float(n)) for n in re.findall(r'camelid_requests_total\{endpoint="/v1/chat/completions",'
                                                 r'status="200"\} (\S+)', text))


def test_replicas_behind_a_round_robin_balancer(replicas: list[Server]) -> None:
    balancer = RoundRobin([s.port for s in replicas])
    try:
        # a new connection per request, so each one is balanced (as with clients that do not keep connections)
        through = openai.OpenAI(base_url=f"http://127.0.0.1:{balancer.port}/v1", api_key="-", max_retries=0,
                                timeout=120, default_headers={"Connection": "close"})
        direct = openai.OpenAI(base_url=f"{replicas[0].url}/v1", api_key="-", max_retries=0, timeout=120)
        before = [served_requests(s) for s in replicas]
        history = [{"role": "user", "content": "Who is Mr. Knightley?"}]
        for _ in range(3):  # three turns of one conversation, turn by turn on alternating replicas
            kw = dict(model="tiny", messages=history, max_tokens=12, temperature=0)
            reply = through.chat.completions.create(**kw).choices[0].message.content
            assert reply == direct.chat.completions.create(**kw).choices[0].message.content
            streamed = "".join(c.choices[0].delta.content or "" for c in
                               through.chat.completions.create(**kw, stream=True) if c.choices)
            assert streamed == reply
            history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
        after = [served_requests(s) for s in replicas]
        balanced = [a - b for a, b in zip(after, before, strict=True)]
        assert sum(balanced) == 3 * 3 and min(balanced) >= 3  # 6 through the balancer, 3 direct to the first
    finally:
        balancer.close()
