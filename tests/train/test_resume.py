"""Exact resume: a real `camelid pretrain` process killed with SIGKILL mid-run, then resumed, logs the very
same floats (bitwise: the CSV holds repr() of each) as a run that never stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from train_helpers import ROOT, run_camelid, tiny_settings

from camelid.train.plot import read_log

COMPARED = ("step", "loss", "lr", "grad_norm", "val_loss", "val_bpb", "tokens")
STEPS = 150


def settings(data, out):
    return tiny_settings(data, out, max_steps=STEPS, checkpoint_interval=10, eval_interval=25, keep_checkpoints=2)


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(small_data, tmp_path) -> None:
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    run_camelid("pretrain", *settings(small_data, ref_out), "--no-progress")

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "camelid", "pretrain", *settings(small_data, out), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # a few more steps past the checkpoint, so the log holds rows the resume must drop
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    killed_at = int(latest.read_text().strip().removeprefix("step-"))
    assert 0 < killed_at < STEPS
    logged = len(read_log(out / "log.csv"))
    assert logged >= killed_at

    run_camelid("pretrain", *settings(small_data, out), "--resume", "--no-progress")
    ref = [{k: r[k] for k in COMPARED} for r in read_log(ref_out / "log.csv")]
    got = [{k: r[k] for k in COMPARED} for r in read_log(out / "log.csv")]
    assert len(got) == STEPS
    assert got == ref  # same strings = the same float64 values, step for step
    final = [load_file(o / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors") for o in (out, ref_out)]
    assert final[0].keys() == final[1].keys()
    assert all(final[0][k].equal(final[1][k]) for k in final[0])  # bitwise-equal weights
