from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import TINY

from camelid.errors import CamelidError
from camelid.train import checkpoint as ckpt
from camelid.train.config import load_config
from camelid.train.data import TokenShards
from camelid.train.loop import train
from camelid.train.plot import read_log


def tiny(data, out, *extra: str):
    return load_config(None, [*TINY, f"data={data}", f"out={out}", *extra])


@pytest.fixture(scope="module")
def trained(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny(small_data, out, "max_steps=30", "eval_interval=10", "checkpoint_interval=10", "export=true",
               "sample_interval=15", "sample_prompt=Emma")
    result = train(cfg, progress=False)
    return cfg, result, out


def test_training_learns_and_writes_everything(trained) -> None:
    cfg, result, out = trained
    rows = read_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 31))
    losses = [float(r["loss"]) for r in rows]
    assert losses[0] == pytest.approx(math.log(512), rel=0.05)  # starts at chance...
    assert np.mean(losses[-5:]) < losses[0] - 0.6  # ...and learns
    assert [r["step"] for r in rows if r["val_bpb"]] == ["10", "20", "30"]
    assert all(float(r["mfu"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "samples.txt").read_text().count("--- step") == 2
    assert ckpt.latest(out).name == "step-000030"
    if importlib.util.find_spec("tensorboard") is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(out / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("val/val_bpb")] == [10, 20, 30]
        assert len(events.Scalars("train/loss")) == 30
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000020", "step-000030"]


def test_export_loads_in_transformers_and_bits_per_byte_check_out(trained, small_data) -> None:
    """The HF export runs in transformers; its summed NLL over the held-out text gives the logged bits/byte."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    cfg, result, out = trained
    hf = LlamaForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(out / "hf")
    data = TokenShards(small_data)
    val = torch.from_numpy(np.asarray(data.streams["val"]).astype(np.int64))
    nll = 0.0
    with torch.no_grad():
        for s in range(0, len(val) - 1, cfg.block_size):
            chunk = val[s:s + cfg.block_size + 1]
            logits = hf(chunk[None, :-1]).logits[0]
            nll += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
    bpb = nll / math.log(2) / data.meta["val_bytes"]
    # camelid reads its own export back and agrees with transformers on it
    import camelid

    llm = camelid.load(out / "hf", tokenizer=False)
    x = val[None, :cfg.block_size]
    with torch.no_grad():
        assert torch.allclose(llm.model(x), hf(x).logits, atol=1e-4)
    assert result.val_bpb == pytest.approx(bpb, rel=1e-4)
    assert result.val_loss == pytest.approx(nll / (len(val) - 1), rel=1e-4)


def test_activation_checkpointing_gives_the_same_losses(small_data, tmp_path) -> None:
    a = train(tiny(small_data, tmp_path / "a", "max_steps=4", "eval_interval=0", "checkpoint_interval=0"),
              progress=False)
    b = train(tiny(small_data, tmp_path / "b", "max_steps=4", "eval_interval=0", "checkpoint_interval=0",
                   "activation_checkpointing=true"), progress=False)
    la = [float(r["loss"]) for r in read_log(a.out / "log.csv")]
    lb = [float(r["loss"]) for r in read_log(b.out / "log.csv")]
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_compile_gives_the_same_losses_and_resumes_either_way(small_data, tmp_path) -> None:
    # compile=true also compiles the optimizer step on CPU (tensor lr): the same AdamW, and checkpoints
    # written by either kind of step resume under the other
    steps = ("eval_interval=0", "checkpoint_interval=2", "warmup_steps=2")
    a = train(tiny(small_data, tmp_path / "a", "max_steps=4", *steps), progress=False)
    b = train(tiny(small_data, tmp_path / "b", "max_steps=2", "compile=true", *steps), progress=False)
    b = train(tiny(small_data, tmp_path / "b", "max_steps=4", *steps), progress=False, resume=True)
    c = train(tiny(small_data, tmp_path / "c", "max_steps=2", *steps), progress=False)
    c = train(tiny(small_data, tmp_path / "c", "max_steps=4", "compile=true", *steps), progress=False, resume=True)
    la, lb, lc = ([float(r["loss"]) for r in read_log(run.out / "log.csv")] for run in (a, b, c))
    assert len(la) == len(lb) == len(lc) == 4
    assert lb == pytest.approx(la, rel=1e-4) and lc == pytest.approx(la, rel=1e-4)
    lrs = ([float(r["lr"]) for r in read_log(run.out / "log.csv")] for run in (a, b, c))
    assert next(lrs) == next(lrs) == next(lrs)


def test_corrupt_or_missing_checkpoint_is_a_clear_error(trained, small_data, tmp_path) -> None:
    import shutil

    _, _, out = trained
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    good = run / "checkpoints" / "step-000020"
    good_bytes = {f.name: f.read_bytes() for f in good.iterdir()}
    cfg = tiny(small_data, run, "max_steps=40", "eval_interval=0", "checkpoint_interval=10")
    # truncate the newest checkpoint's weights
    weights = run / "checkpoints" / "step-000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CamelidError, match="model.safetensors: damaged"):  # its SHA256SUMS says so
        train(cfg, resume=True, progress=False)
    # a garbage state.pt: its checksum, and without one the weights-only loader, refuse it; it is never unpickled
    shutil.copytree(good, run / "checkpoints" / "step-000030", dirs_exist_ok=True)
    (run / "checkpoints" / "step-000030" / "state.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CamelidError, match="state.pt: damaged"):
        train(cfg, resume=True, progress=False)
    (run / "checkpoints" / "step-000030" / "SHA256SUMS").unlink()
    with pytest.raises(CamelidError, match="state.pt: corrupt"):
        train(cfg, resume=True, progress=False)
    (run / "checkpoints" / "latest").write_text("step-000099\n")
    with pytest.raises(CamelidError, match="missing"):
        train(cfg, resume=True, progress=False)
    with pytest.raises(CamelidError, match="no checkpoint to resume from"):
        train(tiny(small_data, tmp_path / "empty"), resume=True, progress=False)
    assert {f.name: f.read_bytes() for f in good.iterdir()} == good_bytes  # the last good one is untouched


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    state = {"w": torch.ones(3)}
    train_state = {"step": 1, "optimizer": {}, "scheduler": {}, "rng": ckpt.rng_state()}
    ckpt.save(tmp_path, 1, state, train_state, {})
    before = (tmp_path / "checkpoints" / "step-000001" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(CamelidError, match="step-000002: the checkpoint could not be written"):
        ckpt.save(tmp_path, 2, {"w": torch.zeros(3)}, {**train_state, "step": 2}, {})
    assert ckpt.latest(tmp_path).name == "step-000001"
    assert (tmp_path / "checkpoints" / "step-000001" / "model.safetensors").read_bytes() == before
    ckpt.clean_partial(tmp_path)
    assert not list((tmp_path / "checkpoints").glob(".*"))
    weights, _, meta = ckpt.load(ckpt.latest(tmp_path))
    assert weights["w"].equal(torch.ones(3)) and meta["step"] == 1


def test_a_cpu_budget_ends_the_run_with_the_schedule_decayed_and_logs_cpu_time(small_data, tmp_path) -> None:
    """A CPU budget no step fits in: the first step is the last, at min_lr's end of the schedule; cpu_s counts
    this process's CPU seconds (never fewer than 0, never decreasing)."""
    cfg = tiny(small_data, tmp_path, "max_steps=50", "eval_interval=0", "checkpoint_interval=0", "cpu_budget_s=1e-6")
    train(cfg, progress=False)
    rows = read_log(tmp_path / "log.csv")
    assert [int(r["step"]) for r in rows] == [1]
    assert float(rows[0]["cpu_s"]) > 0
    big = tiny(small_data, tmp_path / "b", "max_steps=3", "eval_interval=0", "checkpoint_interval=0",
               "cpu_budget_s=1e6")
    train(big, progress=False)
    cpu = [float(r["cpu_s"]) for r in read_log(tmp_path / "b" / "log.csv")]
    assert len(cpu) == 3 and cpu == sorted(cpu)
    with pytest.raises(CamelidError, match="cpu_budget_s must be"):
        tiny(small_data, tmp_path, "cpu_budget_s=-1")
