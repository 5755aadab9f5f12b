"""SFT through the one training loop: packing changes nothing (loss and gradients equal the unpacked ones), LoRA
trains and exports an adapter camelid and peft read, checkpoints hold the adapter alone, a run killed with
SIGKILL resumes bit for bit, 2 torchrun processes follow 1 process, QLoRA and full fine-tuning run end to end."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner, Result

import camelid
from camelid.cli import COMMAND_MODULES, app
from camelid.errors import CamelidError
from camelid.finetune import SFT, FinetuneConfig, finetune, load_finetune_config
from camelid.finetune.data import make_batch
from camelid.model import Llama
from camelid.train.plot import read_log
from camelid.variants.lora import apply_lora, lora_modules, read_adapter

for _m in COMMAND_MODULES:
    __import__(_m)

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("step", "loss", "lr", "grad_norm", "val_loss", "tokens")


def settings(base: Path, data: Path, out: Path, **extra: object) -> dict[str, object]:
    return {"model": str(base), "data": str(data), "out": str(out), "block_size": 128, "batch_size": 2,
            "max_steps": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "eval_interval": 4,
            "checkpoint_interval": 4, "threads": 1, "lora_rank": 4, "lora_dropout": 0.1, **extra}


def as_sets(values: dict[str, object]) -> list[str]:
    return [x for k, v in values.items() for x in ("--set", f"{k}={v}")]


def cli(*args: str) -> Result:
    """The `camelid` command in this process (a subprocess costs seconds of imports)."""
    return CliRunner().invoke(app, list(args))


def run_camelid(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "camelid", *args], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"camelid {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _randomize(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 0.1)


def test_packed_loss_and_gradients_equal_unpacked(tiny_base: tuple[Path, Path]) -> None:
    """Three examples in one row (block-diagonal attention, positions restarting) against each in its own row: the
    same mean loss over learned tokens and the same adapter gradients (the fast training model), and the same
    loss from the reference model given the explicit mask and positions."""
    base, data = tiny_base
    cfg = FinetuneConfig(**settings(base, data, Path("unused"), block_size=256, lora_dropout=0.0))
    sft = SFT(cfg, torch.device("cpu"))
    model = sft.build_model()
    _randomize(model)
    exs = sft.data.train[:6]
    packed = make_batch(exs, [[0, 1, 2], [3, 4, 5]], sft.pad_id)
    alone = make_batch(exs, [[i] for i in range(6)], sft.pad_id)
    assert packed.n_trained == alone.n_trained and packed.input_ids.shape[0] == 2
    results = []
    for b in (packed, alone):
        model.zero_grad()
        loss = SFT.loss(model, (b, 1.0))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (lp, gp), (lu, gu) = results
    assert abs(lp - lu) < 1e-5
    assert max((gp[n] - gu[n]).abs().max().item() for n in gp) < 1e-5
    # the reference model, with the dense block-diagonal mask and per-row positions
    ref = camelid.load(base, tokenizer=False).model
    torch.manual_seed(cfg.seed)
    apply_lora(ref, cfg.lora_spec())
    for a, b in zip(lora_modules(ref).values(), lora_modules(model).values(), strict=True):
        a.lora_a.data.copy_(b.lora_a)
        a.lora_b.data.copy_(b.lora_b)
    logits = ref(packed.input_ids, packed.documents.positions(), mask=packed.documents.mask())
    ref_loss = F.cross_entropy(logits.flatten(0, 1)[packed.loss_positions],
                               packed.targets.flatten()[packed.loss_positions])
    assert abs(ref_loss.item() - lp) < 1e-5


def test_lora_run_exports_an_adapter_and_checkpoints_only_the_adapter(tiny_base: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    base, data = tiny_base
    cfg = FinetuneConfig(**settings(base, data, tmp_path / "run", max_steps=16, eval_interval=8))
    before = SFT(cfg, torch.device("cpu"))
    base_loss = before.evaluate(before.build_model(), full=True)["val_loss"]
    result = finetune(cfg, progress=False)
    assert result.val_loss < base_loss - 0.1, (base_loss, result.val_loss)  # it learned (a random base: slowly)
    log = read_log(tmp_path / "run" / "log.csv")
    assert len(log) == 16 and int(log[-1]["tokens"]) == result.tokens
    # tokens/s counts real tokens: fewer than the token slots of 16 steps x 2 rows x 128
    assert 0 < result.tokens < 16 * 2 * 128
    ckpt = load_file(tmp_path / "run" / "checkpoints" / "step-000016" / "model.safetensors")
    assert ckpt and all(".lora_" in k for k in ckpt)
    spec, tensors, base_name = read_adapter(tmp_path / "run" / "adapter")
    assert base_name == str(base) and spec.rank == 4
    assert tensors.keys() == ckpt.keys() and all(torch.equal(tensors[k], ckpt[k]) for k in ckpt)
    assert (tmp_path / "run" / "adapter" / "adapter.gguf").is_file()
    # camelid.load(base, adapter=...) gives the trained model's held-out loss
    llm = camelid.load(base, adapter=tmp_path / "run" / "adapter")
    sft = SFT(cfg, torch.device("cpu"))
    reloaded = sft.build_model()
    from camelid.variants.lora import load_lora_state_dict

    load_lora_state_dict(reloaded, tensors)
    assert abs(sft.evaluate(reloaded, full=True)["val_loss"] - result.val_loss) < 1e-5
    x = torch.randint(0, llm.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert (llm.model(x) - Llama.forward(reloaded.eval(), x)).abs().max().item() < 1e-4


def test_qlora_int4_and_full_finetuning_run(tiny_base: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = tiny_base
    q = finetune(FinetuneConfig(**settings(base, data, tmp_path / "q", quantize="int4", max_steps=4)), progress=False)
    assert q.val_loss == q.val_loss  # a number
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()
    full = finetune(FinetuneConfig(**settings(base, data, tmp_path / "full", method="full", lr=1e-3, max_steps=4)),
                    progress=False)
    llm = camelid.load(tmp_path / "full" / "hf")  # a Hugging Face folder with the tokenizer
    assert llm.tokenizer is not None and full.steps == 4
    ckpt = load_file(tmp_path / "full" / "checkpoints" / "step-000004" / "model.safetensors")
    assert "layers.0.attention.wq.weight" in ckpt


def test_a_qlora_base_streams_in_already_quantised(tiny_base: tuple[Path, Path], tmp_path: Path) -> None:
    """From an HF folder and from a GGUF file, quantising while the tensors stream in gives the model that
    quantising the loaded fp32 model gives, bit for bit."""
    from camelid.finetune.objective import load_training_model
    from camelid.interop.gguf import save_gguf
    from camelid.variants.lora import quantize_base
    from camelid.variants.training import TrainLlama

    base, _ = tiny_base
    save_gguf(camelid.load(base, tokenizer=False).model, tmp_path / "base.gguf", progress=False)
    for source in (base, tmp_path / "base.gguf"):
        streamed = load_training_model(str(source), "int4").state_dict()
        whole = quantize_base(TrainLlama.from_model(camelid.load(source, tokenizer=False).model), "int4").state_dict()
        assert streamed.keys() == whole.keys() and "layers.0.attention.wq.qweight" in streamed
        assert all(torch.equal(streamed[k], whole[k]) for k in whole)


def test_epochs_set_the_steps(tiny_base: tuple[Path, Path]) -> None:
    base, data = tiny_base
    cfg = FinetuneConfig(**settings(base, data, Path("unused"), epochs=2.0, max_steps=1))
    sft = SFT(cfg, torch.device("cpu"))
    assert cfg.max_steps == -(-2 * sft.stream.rows_per_epoch() // 2)


def test_bad_settings_are_one_line_errors(tiny_base: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = tiny_base
    with pytest.raises(CamelidError, match="method must be one of lora, full"):
        load_finetune_config(None, ["method=qlora"])
    with pytest.raises(CamelidError, match="quantize=int4 freezes a quantised base for LoRA"):
        load_finetune_config(None, ["method=full", "quantize=int4"])
    with pytest.raises(CamelidError, match="LoRA targets"):
        load_finetune_config(None, ["lora_targets=[q_proj]"])
    cfg = FinetuneConfig(**settings(base, data, tmp_path, lora_rank=1000))
    with pytest.raises(CamelidError, match=r"LoRA rank 1000 is larger than layers\.0\.attention\.wq"):
        SFT(cfg, torch.device("cpu")).build_model()
    result = cli("finetune", *as_sets(settings(base, tmp_path / "missing.jsonl", tmp_path)))
    assert isinstance(result.exception, CamelidError) and "\n" not in str(result.exception)
    assert "missing.jsonl: no such file" in str(result.exception)


def test_show_mask_prints_examples_without_training(tiny_base: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = tiny_base
    result = cli("finetune", *as_sets(settings(base, data, tmp_path / "x")), "--show-mask", "2")
    assert result.exit_code == 0, result.output
    assert "learned tokens between « and »" in result.stdout
    assert result.stdout.count("<|im_start|>assistant\n«") == 2 and result.stdout.count("<|im_end|>»") == 2
    assert not (tmp_path / "x").exists()


def test_adapter_commands_merge_and_export(tiny_base: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = tiny_base
    model = camelid.load(base, tokenizer=False).model
    apply_lora(model, rank=2)
    _randomize(model)
    from camelid.variants.lora import save_adapter

    save_adapter(model, tmp_path / "adapter", base=str(base))
    for args in (["merge", str(tmp_path / "adapter"), str(tmp_path / "merged"), "--to", "hf"],
                 ["export", str(tmp_path / "adapter"), str(tmp_path / "a.gguf")]):
        result = cli("adapter", *args)
        assert result.exit_code == 0, result.output
    merged = camelid.load(tmp_path / "merged")
    x = torch.randint(0, merged.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert (merged.model(x) - model(x)).abs().max().item() < 1e-4
    assert merged.tokenizer is not None and (tmp_path / "a.gguf").stat().st_size > 0
    result = cli("generate", "Hi", "-m", str(base), "--adapter", str(tmp_path / "adapter"), "-n", "3", "-q",
                 "--quantize", "none")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------------
# exact resume and torchrun


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tiny_base: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = tiny_base
    steps = 40
    common = {"max_steps": steps, "checkpoint_interval": 5, "eval_interval": 10}
    run_camelid("finetune", *as_sets(settings(base, data, tmp_path / "ref", **common)), "--no-progress")
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "camelid", "finetune",
                             *as_sets(settings(base, data, out, **common)), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    killed_at = int(latest.read_text().strip().removeprefix("step-"))
    assert 0 < killed_at < steps
    run_camelid("finetune", *as_sets(settings(base, data, out, **common)), "--resume", "--no-progress")
    ref = [{k: r[k] for k in COMPARED} for r in read_log(tmp_path / "ref" / "log.csv")]
    got = [{k: r[k] for k in COMPARED} for r in read_log(out / "log.csv")]
    assert got == ref  # the same floats, step for step (dropout included)
    a, b = (read_adapter(o / "adapter")[1] for o in (out, tmp_path / "ref"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_torchrun_processes_match_one_process_accumulating_two(tiny_base: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    base, data = tiny_base
    common = {"max_steps": 6, "checkpoint_interval": 0, "eval_interval": 3, "lora_dropout": 0.0}
    run_camelid("finetune", *as_sets(settings(base, data, tmp_path / "one", grad_accum=2, **common)), "--no-progress")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "camelid",
           "finetune", *as_sets(settings(base, data, tmp_path / "two", grad_accum=1, **common)), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (read_log(tmp_path / o / "log.csv") for o in ("one", "two"))
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert abs(float(a["loss"]) - float(b["loss"])) < 1e-5
        if a["val_loss"]:
            assert abs(float(a["val_loss"]) - float(b["val_loss"])) < 1e-5
    a, b = (read_adapter(tmp_path / o / "adapter")[1] for o in ("one", "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_config_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "ft.yaml"
    path.write_text("model: smollm2-135m-instruct\ndata: d.jsonl\nlora_rank: 16\nlora_targets: [wq, wv]\n"
                    "fields: {output: response}\n")
    cfg = load_finetune_config(path, ["lora_alpha=32", "packing=false"])
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.packing, cfg.fields) == (16, 32.0, False, {"output": "response"})
    assert cfg.lora_spec().targets == ["wq", "wv"] and cfg.export_path == Path("out/finetune/adapter")
    assert json.loads(json.dumps(cfg.to_dict()))["lora_targets"] == ["wq", "wv"]
    assert copy.deepcopy(cfg) == cfg
