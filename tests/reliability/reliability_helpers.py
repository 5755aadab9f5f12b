"""Helpers of the reliability tests (`from reliability_helpers import ...`): run the real `camelid` command (in a
subprocess, or its entry point in this process) and check what a user sees (exit status, stderr)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
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


def camelid_main(*args: str | Path, cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """`camelid ARGS` through its entry point (camelid.cli.main) in this process: the same exit status, stdout and
    stderr as the command, without the seconds a new Python process spends importing torch. For cases where the
    process itself does not matter (what its stdin is, how it dies); an exception that escapes main() is a
    traceback the user would have seen: it becomes stderr with exit status 1, and fails assert_one_line_error."""
    from camelid.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_stdin, saved_cwd = sys.stdin, os.getcwd()
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - what the user would see: a traceback
                traceback.print_exc(file=sys.stderr)
                code = 1
    finally:
        sys.stdin = saved_stdin
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(["camelid", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str, others: tuple[str, ...] = ()) -> str:
    """Exit status 1, no traceback, and stderr one `error:` line that contains every needle. Other lines allowed:
    camelid's progress lines (`camelid: loading ...`) and `others`, prefixes of the informational lines a command
    prints before it fails (a chat's banner)."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    allowed = ("camelid: ", *others)
    assert all(line in errors or line.startswith(allowed) for line in lines), result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def settings(*pairs: str) -> list[str]:
    return [x for p in pairs for x in ("--set", p)]
