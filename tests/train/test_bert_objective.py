"""`camelid pretrain --objective mlm+nsp`: BERT pre-training through the same loop as a LLaMA's, on a small inline
corpus: it learns, exports a BertForPreTraining that transformers loads and agrees with, and resumes exactly
after kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ROOT, run_camelid

from camelid.bert.data import load_pairs
from camelid.bert.model import IGNORE
from camelid.errors import CamelidError
from camelid.train.config import load_config
from camelid.train.plot import read_log

ANIMALS = ["cat", "dog", "llama", "camel", "horse", "sheep"]
PLACES = ["mat", "field", "barn", "hill", "road", "river"]
VERBS = ["sat on", "ran to", "slept by", "looked at"]


def story(seed: int, n_docs: int = 6, n_sent: int = 40) -> str:
    """Chapters in a tiny grammar, one animal per chapter: MLM and NSP both have something to learn."""
    rng = random.Random(seed)
    chapters = []
    for c in range(n_docs):
        animal = ANIMALS[(c + seed) % len(ANIMALS)]
        sents = [f"The {animal} {rng.choice(VERBS)} the {rng.choice(PLACES)}." for _ in range(n_sent)]
        chapters.append(f"CHAPTER {c + 1}\n\n" + " ".join(sents) + "\n")
    return "\n".join(chapters)


TINY_BERT = ["model=bert-test", "block_size=32", "batch_size=16", "warmup_steps=5", "lr=3e-3", "min_lr=3e-4",
             "threads=1", "sample_interval=0", "eval_tokens=2048"]


def settings(data, out, **extra) -> list[str]:
    sets = [*TINY_BERT, f"data={data}", f"out={out}", *(f"{k}={v}" for k, v in extra.items())]
    return ["--objective", "mlm+nsp", *(x for s in sets for x in ("--set", s)), "--no-progress"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    (d / "a.txt").write_text(story(1))
    (d / "b.txt").write_text(story(2))
    (d / "held.txt").write_text(story(3))
    r = run_camelid("prepare", "a.txt", "b.txt", "held.txt", "--objective", "mlm+nsp", "--val-files", "held.txt",
                    "--vocab-size", "120", "-o", "data", cwd=d)
    assert "WordPiece vocabulary of" in r.stdout
    return d / "data"


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = run_camelid("pretrain", *settings(pairs, out, max_steps=60, eval_interval=30, checkpoint_interval=30,
                                          export="true"))
    return out, r


def test_pretrain_mlm_nsp_learns_and_logs(trained) -> None:
    out, r = trained
    assert "held-out baseline (unigram): MLM accuracy" in r.stdout
    assert "done: 60 steps" in r.stdout and "MLM accuracy" in r.stdout and "NSP accuracy" in r.stdout
    rows = read_log(out / "log.csv")
    assert [int(x["step"]) for x in rows] == list(range(1, 61))
    losses = [float(x["loss"]) for x in rows]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # MLM + NSP loss falls
    evals = [x for x in rows if x["val_mlm_acc"]]
    assert [x["step"] for x in evals] == ["30", "60"]
    assert float(evals[-1]["val_mlm_acc"]) > 0.3  # the grammar's words are predictable; chance is ~1/120
    assert json.loads((out / "config.json").read_text())["objective"] == "mlm+nsp"
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000060"


def test_export_is_a_bert_for_pretraining_that_transformers_runs_alike(trained, pairs) -> None:
    import transformers

    from camelid.interop.bert_hf import load_bert_hf_dir
    from camelid.tokenizer.wordpiece import WordPiece

    out, _ = trained
    ref = transformers.BertForPreTraining.from_pretrained(str(out / "hf")).eval()
    _, ours, _ = load_bert_hf_dir(out / "hf")
    assert ref.config.vocab_size == WordPiece.from_dir(out / "hf").vocab_size
    _, val = load_pairs(pairs, max_len=32)
    b = next(val.heldout_batches(0, 8))
    with torch.no_grad():
        expected = ref(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],
                       attention_mask=b["attention_mask"])
        mlm, nsp = ours(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    assert torch.allclose(mlm, expected.prediction_logits, atol=1e-4)
    assert torch.allclose(nsp, expected.seq_relationship_logits, atol=1e-4)
    # the exported weights are the final checkpoint's
    final = load_file(out / "checkpoints" / "step-000060" / "model.safetensors")
    assert torch.equal(final["bert.embeddings.tok_embeddings.weight"], ours.bert.embeddings.tok_embeddings.weight)
    # and the training loss (masked positions only) is transformers' BertForPreTraining loss
    from camelid.train.objectives import MaskedLM

    labels = b["mlm_labels"]
    assert (labels != IGNORE).any()
    with torch.no_grad():
        got = MaskedLM.loss(ours, b)
        want = ref(**{k: b[k] for k in ("input_ids", "token_type_ids", "attention_mask")}, labels=labels,
                   next_sentence_label=b["nsp_labels"]).loss
    assert float(got) == pytest.approx(float(want), abs=1e-5)


def test_kill_9_then_resume_matches_an_uninterrupted_run(pairs, tmp_path) -> None:
    steps = 40
    ref_out, out = tmp_path / "ref", tmp_path / "killed"

    def args(o):
        return settings(pairs, o, max_steps=steps, eval_interval=10, checkpoint_interval=5, export="false")

    run_camelid("pretrain", *args(ref_out))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "camelid", "pretrain", *args(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)  # a few steps past the checkpoint, so the log holds rows the resume must drop
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    killed_at = int(latest.read_text().strip().removeprefix("step-"))
    assert 0 < killed_at < steps

    run_camelid("pretrain", *args(out), "--resume")
    compared = ("step", "loss", "lr", "grad_norm", "val_loss", "val_mlm_loss", "val_mlm_acc", "val_nsp_acc", "tokens")
    ref = [{k: r[k] for k in compared} for r in read_log(ref_out / "log.csv")]
    got = [{k: r[k] for k in compared} for r in read_log(out / "log.csv")]
    assert len(got) == steps and got == ref  # same strings = the same floats, step for step (dropout included)
    final = [load_file(o / "checkpoints" / f"step-{steps:06d}" / "model.safetensors") for o in (out, ref_out)]
    assert final[0].keys() == final[1].keys()
    assert all(final[0][k].equal(final[1][k]) for k in final[0])


def test_the_unigram_baseline_is_a_line_on_the_validation_plot(pairs, tmp_path) -> None:
    from camelid.train.objectives import MaskedLM

    cfg = load_config(None, ["objective=mlm+nsp", *TINY_BERT, f"data={pairs}", f"out={tmp_path}"])
    objective = MaskedLM(cfg, torch.device("cpu"))
    assert objective.references == {}
    line = objective.intro()
    acc = objective.references["unigram baseline"]
    assert 0 < acc < 1 and f"MLM accuracy {acc:.3f}" in line


def test_batches_depend_on_seed_step_and_index_alone(pairs) -> None:
    train, _ = load_pairs(pairs, max_len=32)
    a = train.batch_at(7, 3, 1, 4)
    train.batch_at(7, 4, 0, 4)
    b = train.batch_at(7, 3, 1, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train.batch_at(7, 3, 2, 4)
    assert a["input_ids"].shape != c["input_ids"].shape or not torch.equal(a["input_ids"], c["input_ids"])


def test_errors_are_one_line(pairs, tmp_path) -> None:
    r = run_camelid("pretrain", "--objective", "mlm", "--set", "threads=1", check=False, cwd=tmp_path)
    assert r.returncode == 1 and "objective must be one of clm, mlm+nsp" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(CamelidError, match="not a BERT config"):
        load_config(None, ["objective=mlm+nsp"]).bert_config(100)
    # a BERT folder is not token shards, and token shards are not a BERT folder: both say so
    from camelid.train.loop import train

    with pytest.raises(CamelidError, match="prepared for objective mlm\\+nsp"):
        train(load_config(None, [f"data={pairs}", f"out={tmp_path / 'o'}", "threads=1"]), progress=False)
    r = run_camelid("prepare", "x.txt", "--objective", "mlm+nsp", check=False, cwd=tmp_path)
    assert r.returncode == 1 and "no such file" in r.stderr


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(pairs, tmp_path) -> None:
    """DDP: 2 processes x 1 micro-batch follow 1 process x 2 micro-batches (pairs, masks and dropout included)."""
    from test_distributed import torchrun

    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(max_steps=6, eval_interval=3, checkpoint_interval=0, batch_size=8)
    run_camelid("pretrain", *settings(pairs, one, grad_accum=2, **common))
    torchrun("pretrain", *settings(pairs, two, grad_accum=1, **common))
    ref, got = read_log(one / "log.csv"), read_log(two / "log.csv")
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
    for key in ("loss", "grad_norm", "val_loss", "val_mlm_acc"):
        a, b = [float(r[key]) for r in ref if r[key]], [float(r[key]) for r in got if r[key]]
        assert len(a) == len(b) > 0 and b == pytest.approx(a, rel=1e-5), key
    w = [load_file(o / "hf" / "model.safetensors") for o in (one, two)]
    assert all((w[0][k] - w[1][k]).abs().max().item() < 1e-4 for k in w[0])
