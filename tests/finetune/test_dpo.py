"""DPO and IPO: the loss, rewards and gradients equal trl's DPOTrainer on the same batch and weights, the answers'
log-probabilities equal transformers', the reference is cached once (keyed by model, adapter and data; a stale
file is refused), training through the one loop raises held-out preference accuracy and resumes exactly."""

from __future__ import annotations

import json
import types
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from camelid.errors import CamelidError
from camelid.finetune import FinetuneConfig
from camelid.finetune.dpo import DPO, dpo, dpo_loss, pair_batch, sequence_logps
from camelid.finetune.objective import HeadAt, load_tokenizer, load_training_model
from camelid.finetune.preference import category_split, load_preference_data
from camelid.train.plot import read_log

COMPARED = ("step", "loss", "lr", "grad_norm", "val_loss", "val_accuracy", "tokens")


@pytest.fixture(scope="module")
def pairs_file(tiny_base: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Preference pairs from the chatterbot dialogues: the dialogue's own reply is chosen, the same reply after a
    curt "no no no." rejected (a preference a tiny model can learn and carry to held-out prompts); two categories."""
    _, chat = tiny_base
    rows = [json.loads(line) for line in chat.read_text(encoding="utf-8").splitlines()]
    convs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows
             if len(r["messages"]) >= 2 and r["messages"][1]["role"] == "assistant"]
    out = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    lines = []
    for i, (prompt, reply) in enumerate(convs[:120]):
        lines.append(json.dumps({"prompt": prompt, "chosen": reply, "rejected": f"no no no. {reply}",
                                 "category": "a" if i % 2 else "b"}))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def settings(base: Path, data: Path, out: Path, **extra: object) -> dict[str, object]:
    return {"objective": "dpo", "model": str(base), "data": str(data), "out": str(out), "block_size": 128,
            "batch_size": 4, "max_steps": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "eval_interval": 4,
            "checkpoint_interval": 4, "threads": 1, "lora_rank": 4, "lora_dropout": 0.0, "dpo_beta": 0.5, **extra}


def _trl_dpo(kind: str, beta: float, smoothing: float, hf: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    """trl's DPOTrainer._compute_loss on a stand-in trainer that holds the settings it reads (one process, reference
    log-probabilities precomputed), on `hf` with trl's fused head; returns (loss fn, its metrics)."""
    trl = pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    same = lambda x: x  # noqa: E731 - one process: gathering changes nothing
    trainer = types.SimpleNamespace(
        model=hf, accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=same, gather=same,
                                                    unwrap_model=same),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[kind], loss_weights=[1.0], beta=beta, label_smoothing=smoothing, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    return lambda inputs: (trl.DPOTrainer._compute_loss(trainer, hf, inputs, False), trainer._metrics["train"])


@pytest.mark.parametrize(("kind", "trl_kind", "beta", "smoothing", "n_pairs", "frozen_head"),
                         [("sigmoid", "sigmoid", 0.1, 0.0, 3, False), ("ipo", "ipo", 0.1, 0.0, 3, False),
                          # trl's label smoothing lives in its "aot" loss, which sorts the batch's log-ratios: on one
                          # pair that is the smoothed sigmoid loss itself
                          ("sigmoid", "aot", 0.3, 0.2, 1, False),
                          # a frozen (tied) head, as under LoRA: camelid's chunked head (ops.head_loss.token_logprobs)
                          ("sigmoid", "sigmoid", 0.1, 0.0, 3, True)])
def test_loss_rewards_and_gradients_equal_trl(tiny_base: tuple[Path, Path], pairs_file: Path, kind: str,
                                              trl_kind: str, beta: float, smoothing: float, n_pairs: int,
                                              frozen_head: bool) -> None:
    """The same pairs and weights in camelid and in transformers + trl's DPOTrainer loss: equal answer
    log-probabilities, loss, rewards, margins and accuracy, and equal gradients of the embedding (or, with the
    head frozen, of the first query projection) and final norm."""
    transformers = pytest.importorskip("transformers")
    base, _ = tiny_base
    cfg = FinetuneConfig(**settings(base, pairs_file, Path("unused"), dpo_loss=kind, dpo_beta=beta,
                                    label_smoothing=smoothing))
    tok = load_tokenizer(str(base))
    pairs = load_preference_data(cfg, tok).train[:n_pairs]
    b, counts = pair_batch(pairs, tok.eos_id or 0)
    ours = HeadAt(load_training_model(str(base))).requires_grad_(True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).train()
    if frozen_head:
        for w in (ours.llama.output.weight, ours.llama.tok_embeddings.weight, hf.lm_head.weight,
                  hf.model.embed_tokens.weight):
            w.requires_grad_(False)
    trl_loss = _trl_dpo(trl_kind, beta, smoothing, hf)
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = max(len(e.ids) for e in rows)
    inputs = {"input_ids": torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in rows]),
              "attention_mask": torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in rows]),
              "completion_mask": torch.tensor([[int(x) for x in e.trained] + [0] * (T - len(e.ids)) for e in rows])}
    mine = sequence_logps(ours, b, torch.device("cpu"))
    ref = (mine.detach() + torch.linspace(-2, 2, 2 * n_pairs)).double()  # some reference, the same for both
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref[:n_pairs].float(), ref[n_pairs:].float()
    theirs, metrics = trl_loss(inputs)
    scale = counts if kind == "ipo" else torch.ones_like(counts)
    losses, chosen, rejected = dpo_loss(mine[:n_pairs] / scale[:n_pairs], mine[n_pairs:] / scale[n_pairs:],
                                        ref[:n_pairs] / scale[:n_pairs], ref[n_pairs:] / scale[n_pairs:], beta,
                                        smoothing, kind)
    torch.testing.assert_close(losses.mean().double(), theirs.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.double().mean(), torch.tensor(metrics["logps/chosen"] + metrics["logps/rejected"],
                                                                  dtype=torch.float64).mean(), rtol=1e-5, atol=1e-4)
    if kind == "sigmoid":  # trl's rewards are on summed log-probabilities
        for name, value in (("rewards/chosen", chosen.mean()), ("rewards/rejected", rejected.mean()),
                            ("rewards/margins", (chosen - rejected).mean()),
                            ("rewards/accuracies", (chosen > rejected).double().mean())):
            assert abs(float(value) - metrics[name][0]) < 1e-5, name
    losses.mean().backward()
    theirs.backward()
    if frozen_head:
        torch.testing.assert_close(ours.llama.layers[0].attention.wq.weight.grad,
                                   hf.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-4, atol=1e-6)
    else:
        torch.testing.assert_close(ours.llama.tok_embeddings.weight.grad, hf.model.embed_tokens.weight.grad,
                                   rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.llama.norm.weight.grad, hf.model.norm.weight.grad, rtol=1e-4, atol=1e-6)


def test_category_split_is_deterministic_and_keeps_prompts_together() -> None:
    records = [(f"f:{i}", {"prompt": f"p{i // 3}", "chosen": "a", "rejected": "b", "category": c})
               for i, c in enumerate(["x"] * 30 + ["y"] * 30)]
    train, val = category_split(records)
    assert category_split(list(reversed(records)))[1] == list(reversed(val))
    assert {r["prompt"] for _, r in train}.isdisjoint({r["prompt"] for _, r in val})
    assert {r["category"] for _, r in val} == {"x", "y"}
    assert 0.1 < len(val) / len(records) < 0.35


def test_empty_side_is_a_one_line_error(tiny_base: tuple[Path, Path], tmp_path: Path) -> None:
    base, _ = tiny_base
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": ""}) + "\n")
    cfg = FinetuneConfig(**settings(base, bad, tmp_path))
    with pytest.raises(CamelidError, match=r"bad.jsonl:1: the 'rejected' side is empty") as e:
        load_preference_data(cfg, load_tokenizer(str(base)))
    assert "\n" not in str(e.value)


def test_dpo_raises_heldout_accuracy_caches_the_reference_and_refuses_a_stale_one(
        tiny_base: tuple[Path, Path], pairs_file: Path, tmp_path: Path) -> None:
    base, _ = tiny_base
    run = dpo(FinetuneConfig(**settings(base, pairs_file, tmp_path / "run", max_steps=16, eval_interval=16)),
              progress=False)
    log = read_log(tmp_path / "run" / "log.csv")
    assert abs(float(log[0]["loss"]) - F.softplus(torch.tensor(0.0)).item()) < 1e-6  # policy == reference: log 2
    assert run.val_metrics["val_accuracy"] >= 0.8  # at the start every margin is 0 (accuracy 0)
    assert run.val_metrics["train_accuracy"] >= 0.8
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    caches = list((tmp_path / "run" / "reference").glob("*.safetensors"))
    assert len(caches) == 1
    # a second objective on the same model and data reads the cache instead of computing it
    cfg = FinetuneConfig(**settings(base, pairs_file, tmp_path / "run"))
    again = DPO(cfg, torch.device("cpu"))
    again.build_model()
    assert again.reference_note.startswith("reference log-probabilities read from")
    # the same file named for other data (fewer pairs): refused as stale
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(pairs_file.read_text().splitlines(keepends=True)[:40]))
    cfg = FinetuneConfig(**settings(base, fewer, tmp_path / "other", reference_cache=str(caches[0])))
    with pytest.raises(CamelidError, match="stale reference cache") as e:
        DPO(cfg, torch.device("cpu")).build_model()
    assert "\n" not in str(e.value)


def test_cached_reference_equals_the_live_one_and_ipo_runs(tiny_base: tuple[Path, Path], pairs_file: Path,
                                                           tmp_path: Path) -> None:
    base, _ = tiny_base
    cached = dpo(FinetuneConfig(**settings(base, pairs_file, tmp_path / "c", max_steps=4)), progress=False)
    live = dpo(FinetuneConfig(**settings(base, pairs_file, tmp_path / "l", max_steps=4, reference="live")),
               progress=False)
    a, b = (read_log(tmp_path / o / "log.csv") for o in ("c", "l"))
    for x, y in zip(a, b, strict=True):
        assert abs(float(x["loss"]) - float(y["loss"])) < 1e-5
    assert abs(cached.val_metrics["val_margin"] - live.val_metrics["val_margin"]) < 1e-4
    ipo = dpo(FinetuneConfig(**settings(base, pairs_file, tmp_path / "i", max_steps=4, dpo_loss="ipo")),
              progress=False)
    first = float(read_log(tmp_path / "i" / "log.csv")[0]["loss"])
    assert abs(first - (1 / (2 * 0.5)) ** 2) < 1e-6  # policy == reference: (0 - 1/(2 beta))^2
    assert ipo.steps == 4


def test_resume_matches_an_uninterrupted_run(tiny_base: tuple[Path, Path], pairs_file: Path, tmp_path: Path) -> None:
    base, _ = tiny_base
    dpo(FinetuneConfig(**settings(base, pairs_file, tmp_path / "ref", lora_dropout=0.1, lr_schedule="constant")),
        progress=False)
    dpo(FinetuneConfig(**settings(base, pairs_file, tmp_path / "cut", lora_dropout=0.1, max_steps=4,
                                       lr_schedule="constant")),
        progress=False)
    dpo(FinetuneConfig(**settings(base, pairs_file, tmp_path / "cut", lora_dropout=0.1, lr_schedule="constant")),
        resume=True,
        progress=False)
    ref = [{k: r[k] for k in COMPARED} for r in read_log(tmp_path / "ref" / "log.csv")]
    got = [{k: r[k] for k in COMPARED} for r in read_log(tmp_path / "cut" / "log.csv")]
    assert got == ref


@pytest.mark.slow
def test_two_torchrun_processes_match_one_process_accumulating_two(tiny_base: tuple[Path, Path], pairs_file: Path,
                                                                   tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    base, _ = tiny_base
    common = {"max_steps": 4, "checkpoint_interval": 0, "eval_interval": 2, "batch_size": 2}
    dpo(FinetuneConfig(**settings(base, pairs_file, tmp_path / "one", grad_accum=2, **common)), progress=False)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    sets = [x for k, v in settings(base, pairs_file, tmp_path / "two", grad_accum=1, **common).items()
            for x in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "camelid",
           "finetune", *sets, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (read_log(tmp_path / o / "log.csv") for o in ("one", "two"))
    for a, b in zip(one, two, strict=True):
        assert abs(float(a["loss"]) - float(b["loss"])) < 1e-5
        if a["val_loss"]:
            assert abs(float(a["val_loss"]) - float(b["val_loss"])) < 1e-5
