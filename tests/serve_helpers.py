"""A live `camelid serve` subprocess on a free loopback port (Server), one HTTP request with the standard
library (request), and the tiny model the server tests load (tiny_bpe_llama), for the serving and eval tests."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def request(url: str, method: str = "GET", path: str = "/", body: Any = None, headers: dict[str, str] | None = None,
            timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with the standard library: (status, headers, body). `body`: bytes, or JSON-encoded."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def tiny_bpe_llama(out: Path) -> Path:
    """A random LLaMA (peaked logits, 512 positions) with a 400-token BPE vocabulary and ChatML specials, written
    to `out` as a Hugging Face folder."""
    import torch
    from helpers import peaked_model

    from camelid.interop.hf import save_hf_dir
    from camelid.tokenizer import Tokenizer
    from camelid.tokenizer.train import train_tokenizer

    text = (ROOT / "data" / "austen" / "emma.txt").read_text(encoding="utf-8")[20000:50000]
    (out / "corpus.txt").write_text(text, encoding="utf-8")
    train_tokenizer([out / "corpus.txt"], 400, out, show_progress=False)
    (out / "corpus.txt").unlink()
    tok = Tokenizer.from_dir(out)
    torch.manual_seed(0)
    model = peaked_model("tiny-gqa", vocab_size=tok.vocab_size, max_seq_len=512, intermediate_size=192,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    save_hf_dir(model, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m camelid serve MODEL --port PORT ...` as a subprocess, up once /health answers."""

    def __init__(self, model: str | Path, *args: str, log: Path, env: dict[str, str] | None = None,
                 wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "camelid", "serve", str(model), "--port", str(self.port), "--quiet", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),  # noqa: SIM115
                                     env={**os.environ, **(env or {})}, cwd=ROOT)
        if wait:
            self.wait_ready()

    def wait_ready(self, startup_s: float = 600.0) -> None:
        """Until /health answers (a first run may build the C++ kernels)."""
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"camelid serve exited with {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                if request(self.url, path="/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"camelid serve did not start in {startup_s}s: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")
