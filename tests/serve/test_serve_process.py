"""`camelid serve` as a process: it runs with a short OpenMP spin (so idle workers leave the cores to the threads
that stream tokens) unless the user set one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc/PID/environ (Linux)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _served_environment(model: Path, env: dict[str, str]) -> dict[str, str]:
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "camelid", "serve", str(model), "--port", str(port), "--quiet",
                             "--slots", "1", "--threads", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
        return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_the_server_process_spins_briefly_unless_told_otherwise(tiny_model: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    assert _served_environment(tiny_model, env)["GOMP_SPINCOUNT"] == "10000"
    assert _served_environment(tiny_model, {**env, "GOMP_SPINCOUNT": "777"})["GOMP_SPINCOUNT"] == "777"
