"""Helpers of the reliability tests (`from reliability_helpers import ...`): run the real `camelid` command in a
subprocess and check what a user sees (exit status, stderr)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AUSTEN = ROOT / "data" / "austen"

# a model of 0.1M parameters trained for a few steps: checkpoints of about 1.5 MB
TINY_RUN = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.intermediate_size=128",
            "block_size=32", "batch_size=2", "warmup_steps=2", "threads=1", "sample_interval=0", "eval_interval=0",
            "export=false"]


def camelid(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, stdin: bytes | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m camelid ARGS` as a user runs it; stdout and stderr as text. `timeout` only guards against a
    hang (the test then fails), it measures nothing."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "camelid", *map(str, args)], cwd=cwd, env=full_env, input=stdin,
                          capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str, others: tuple[str, ...] = ()) -> str:
    """Exit status 1, no traceback, and stderr one `error:` line that contains every needle. `others`: prefixes of
    the informational lines a command prints before it fails (a chat's banner), the only other lines allowed."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert all(line in errors or line.startswith(others) for line in lines) if others else len(lines) == 1, \
        result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def settings(*pairs: str) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]
