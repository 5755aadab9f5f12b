"""`camelid bert pretrain`: text files to a BERT through the training loop, its outputs, resume, time budget, CLI."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
import transformers
from bert_corpus import synthetic_text

from camelid import CamelidError
from camelid.bert.pretrain import PretrainArgs, pretrain_bert
from camelid.cli import main
from camelid.tokenizer.wordpiece import WordPiece
from camelid.train.plot import read_log


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine threads fight each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_pretraining_beats_the_unigram_baseline(tmp_path):
    args = PretrainArgs(config="bert-test", vocab_size=120, max_len=32, batch_size=16, steps=70, lr=3e-3,
                        warmup=10, eval_batches=8)
    metrics = pretrain_bert([synthetic_text(1)], [synthetic_text(2)], tmp_path, args, quiet=True)
    h = metrics["heldout"]
    assert h["mlm_accuracy"] > h["unigram_top1_accuracy"] + 0.15, h
    assert h["mlm_loss"] < h["unigram_loss"], h
    # the saved folder is a BertForPreTraining that transformers loads, with our tokenizer beside it
    ref = transformers.BertForPreTraining.from_pretrained(str(tmp_path))
    assert ref.config.vocab_size == WordPiece.from_dir(tmp_path).vocab_size
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text())["heldout"] == h


def test_cli_pretrain_and_errors(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(synthetic_text(3))
    (tmp_path / "b.txt").write_text(synthetic_text(4))
    with pytest.raises(SystemExit) as e:
        main(["bert", "pretrain", str(tmp_path), "--holdout", "c.txt", "--out", str(tmp_path / "o")])
    assert e.value.code == 1 and "not one of the corpus files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bert", "pretrain", str(tmp_path), "--holdout", "b.txt", "--out", str(tmp_path / "o"),
              "--config", "bert-test", "--vocab-size", "100", "--max-len", "32", "--steps", "3",
              "--eval-batches", "1", "--batch-size", "4"])
    assert "held-out MLM accuracy" in capsys.readouterr().out


def test_resume_continues_the_run(tmp_path):
    """--resume picks the run up at its last checkpoint (the loop's exact resume; tests/train covers the floats)."""
    args = PretrainArgs(config="bert-test", vocab_size=120, max_len=32, batch_size=4, steps=4, warmup=2,
                        eval_batches=1, eval_interval=2, checkpoint_interval=2, threads=1)
    texts = [synthetic_text(5)], [synthetic_text(6)]
    pretrain_bert(*texts, tmp_path, args, quiet=True)
    metrics = pretrain_bert(*texts, tmp_path, PretrainArgs(**{**asdict(args), "steps": 6}), quiet=True, resume=True)
    assert metrics["steps_done"] == 6
    assert [int(r["step"]) for r in read_log(tmp_path / "training" / "log.csv")] == list(range(1, 7))
    with pytest.raises(CamelidError, match="already at max_steps 6"):
        pretrain_bert(*texts, tmp_path, PretrainArgs(**{**asdict(args), "steps": 6}), quiet=True, resume=True)


def test_a_time_budget_ends_the_run_early_with_the_schedule_decayed(tmp_path):
    """A budget no step fits in: the run stops after its first step, and that step is the schedule's last."""
    args = PretrainArgs(config="bert-test", vocab_size=120, max_len=32, batch_size=4, steps=50, warmup=0,
                        eval_batches=1, checkpoint_interval=10, threads=1, time_budget_s=1e-6)
    metrics = pretrain_bert([synthetic_text(5)], [synthetic_text(6)], tmp_path, args, quiet=True)
    assert metrics["steps_done"] == 1 and (tmp_path / "training" / "checkpoints" / "step-000001").is_dir()
    assert metrics["heldout"]["masked_tokens"] > 0  # the last evaluation ran, on every held-out pair
