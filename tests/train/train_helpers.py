"""Helpers shared by the training tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AUSTEN = ROOT / "data" / "austen"


def run_camelid(*args: str, cwd: Path | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "camelid", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"camelid {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.intermediate_size=128",
        "block_size=32", "batch_size=4", "warmup_steps=3", "lr=3e-3", "min_lr=3e-4", "threads=1",
        "sample_interval=0", "export=false", "eval_tokens=1024"]


def tiny_settings(data: Path, out: Path, **extra) -> list[str]:
    sets = [*TINY, f"data={data}", f"out={out}", *(f"{k}={v}" for k, v in extra.items())]
    return [x for s in sets for x in ("--set", s)]


_encoded = 0


def dying_encode(text: str) -> list[int]:
    """Stands in for camelid.train.data._encode in a pool worker: encodes one piece, then crashes."""
    from camelid.train.data import _worker_tok

    global _encoded
    _encoded += 1
    if _encoded > 1:
        raise RuntimeError("simulated crash")
    return _worker_tok.encode(text)
