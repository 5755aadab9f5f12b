from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AUSTEN = ROOT / "data" / "austen"


def camelid(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "camelid", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_tokenizer_train_prepare_pretrain_from_the_command_line(tmp_path) -> None:
    """The newcomer's path, end to end, on a sliver of Austen: each command's output feeds the next."""
    for name in ("emma", "persuasion"):
        (tmp_path / f"{name}.txt").write_text((AUSTEN / f"{name}.txt").read_text()[:30000])
    r = camelid("tokenizer", "train", "emma.txt", "--vocab-size", "400", "--out", "tok", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "400 tokens" in r.stdout
    r = camelid("prepare", "emma.txt", "persuasion.txt", "-t", "tok", "-o", "data", "--val-files", "persuasion.txt",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "val" in r.stdout and json.loads((tmp_path / "data" / "meta.json").read_text())["val_docs"] == 1
    (tmp_path / "run.toml").write_text(
        'data = "data"\nout = "out"\nmax_steps = 3\nblock_size = 32\nbatch_size = 2\nthreads = 1\n'
        'eval_interval = 3\neval_tokens = 256\nsample_interval = 3\nsample_tokens = 8\n'
        '[model]\ndim = 32\nn_layers = 1\nn_heads = 2\nintermediate_size = 64\n')
    r = camelid("pretrain", "run.toml", "--set", "warmup_steps=1", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "done: 3 steps" in r.stdout and "bits/byte" in r.stdout
    hf = json.loads((tmp_path / "out" / "hf" / "config.json").read_text())
    assert hf["vocab_size"] == 400 and hf["hidden_size"] == 32 and hf["eos_token_id"] == 0
    # resuming a finished run says what to do, in one line, without a traceback
    r = camelid("pretrain", "run.toml", "--resume", "--no-progress", cwd=tmp_path)
    assert r.returncode == 1 and "raise max_steps" in r.stderr and "Traceback" not in r.stderr


def test_command_line_errors_are_one_line(tmp_path) -> None:
    cases = [
        (("pretrain", "missing.yaml"), "no such config file"),
        (("pretrain", "--set", "nonsense"), "not key=value"),
        (("pretrain", "--set", "data=nowhere", "--set", "threads=1"), "not a prepared data folder"),
        (("prepare", "nothing.txt", "-t", "tok"), "no such file"),
        (("tokenizer", "train", "nothing.txt"), "no such file"),
    ]
    for args, message in cases:
        r = camelid(*args, cwd=tmp_path)
        assert r.returncode == 1, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
