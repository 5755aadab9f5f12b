"""torchrun with 2 CPU processes on gloo (DDP, and FSDP2's fully_shard) follows the same loss curve as one
process accumulating the same global batch. Reductions run in a different order, so the match is to a
tolerance (1e-5 relative), not bitwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from train_helpers import ROOT, run_camelid, tiny_settings

from camelid.train.plot import read_log

STEPS = 8


def torchrun(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "camelid", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def single(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_camelid("pretrain", *tiny_settings(small_data, out, max_steps=STEPS, grad_accum=2, eval_interval=4,
                                           checkpoint_interval=0, export="true"), "--no-progress")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(mode, single, small_data, tmp_path) -> None:
    out = tmp_path / mode
    torchrun("pretrain", *tiny_settings(small_data, out, max_steps=STEPS, grad_accum=1, eval_interval=4,
                                        checkpoint_interval=4, distributed=mode, export="true"), "--no-progress")
    ref, got = read_log(single / "log.csv"), read_log(out / "log.csv")
    assert [r["step"] for r in got] == [str(s) for s in range(1, STEPS + 1)]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]  # the same global batch
    for key in ("loss", "val_loss", "val_bpb", "grad_norm"):
        a = [float(r[key]) for r in ref if r[key]]
        b = [float(r[key]) for r in got if r[key]]
        assert b == pytest.approx(a, rel=1e-5), key
    # the final weights (gathered from the shards under FSDP) agree too
    w_ref, w = load_file(single / "hf" / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert w.keys() == w_ref.keys()
    for k in w:
        assert (w[k] - w_ref[k]).abs().max().item() < 1e-4, k
    # resuming the 2-process run from its step-4 checkpoint (sharded state gathered and re-sharded under FSDP)
    # repeats steps 5-8 exactly
    resumed = tmp_path / f"{mode}-resumed"
    shutil.copytree(out, resumed)
    (resumed / "checkpoints" / "latest").write_text("step-000004\n")
    torchrun("pretrain", *tiny_settings(small_data, resumed, max_steps=STEPS, grad_accum=1, eval_interval=4,
                                        checkpoint_interval=4, distributed=mode, export="false"), "--resume",
             "--no-progress")
    keys = ("step", "loss", "lr", "grad_norm", "val_loss", "val_bpb")
    assert [[r[k] for k in keys] for r in read_log(resumed / "log.csv")] == [[r[k] for k in keys] for r in got]
