"""MLM + NSP data and loss: masking statistics, pairs, the loss against transformers, and a tiny run that learns."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from camelid import BertConfig, CamelidError
from camelid.bert.data import PretrainingData, mask_tokens, split_sentences
from camelid.bert.model import IGNORE, BertForPreTraining, pretraining_loss
from camelid.bert.pretrain import PretrainArgs, pretrain_bert
from camelid.cli import main
from camelid.interop.bert_hf import save_bert_hf_dir
from camelid.tokenizer.wordpiece import WordPiece

ANIMALS = ["cat", "dog", "llama", "camel", "horse", "sheep"]
PLACES = ["mat", "field", "barn", "hill", "road", "river"]
VERBS = ["sat on", "ran to", "slept by", "looked at"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine threads fight each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def synthetic_text(seed: int, n_docs: int = 6, n_sent: int = 40) -> str:
    """Documents in a tiny grammar: in each chapter one animal; sentences follow a fixed template."""
    rng = random.Random(seed)
    chapters = []
    for c in range(n_docs):
        animal = ANIMALS[c % len(ANIMALS)]
        sents = [f"The {animal} {rng.choice(VERBS)} the {rng.choice(PLACES)}." for _ in range(n_sent)]
        chapters.append(f"CHAPTER {c + 1}\n\n" + " ".join(sents) + "\n")
    return "\n".join(chapters)


def test_mask_tokens_follows_the_80_10_10_rule():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 1000, (200, 500), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    special[:50, 250:] = True  # padding
    corrupted, labels = mask_tokens(ids, special, vocab_size=1000, mask_id=3, generator=g)
    chosen = labels != IGNORE
    n_real = int((~special).sum())
    assert abs(chosen.sum() / n_real - 0.15) < 0.005
    assert not (chosen & special).any() and torch.equal(corrupted[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(corrupted[~chosen], ids[~chosen])
    n = int(chosen.sum())
    masked = int((corrupted[chosen] == 3).sum())
    kept = int((corrupted[chosen] == ids[chosen]).sum())
    assert abs(masked / n - 0.8) < 0.01
    assert abs(kept / n - 0.1) < 0.01  # (a random token equal to the original counts here: 1 in 1000)
    assert abs((n - masked - kept) / n - 0.1) < 0.01


def test_loss_matches_transformers_bert_for_pretraining(tmp_path):
    config = BertConfig.from_name("bert-test")
    ours = BertForPreTraining(config).eval()
    save_bert_hf_dir(ours, tmp_path)
    ref = transformers.BertForPreTraining.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(5, config.vocab_size, (4, 20))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    corrupted, labels = mask_tokens(ids, special, config.vocab_size, mask_id=4, prob=0.3)
    nsp = torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        expected = ref(input_ids=corrupted, labels=labels, next_sentence_label=nsp).loss
        mlm, nsp_logits = ours(corrupted)
        got = pretraining_loss(mlm, nsp_logits, labels, nsp)
    assert abs(float(got) - float(expected)) < 1e-5


def test_sentence_pairs_for_nsp():
    text = synthetic_text(0)
    raw = 'He came to the house at noon. She left it in a hurry! Did she? Yes.\n\n"Well," said\nhe, "so be it."'
    assert split_sentences(raw) == [
        "He came to the house at noon.", "She left it in a hurry! Did she? Yes.", '"Well," said he, "so be it."']
    tok = WordPiece.train([text], vocab_size=100, min_frequency=1)
    data = PretrainingData.from_texts([text], tok, max_len=32, seed=0)
    assert len(data.documents) == 6
    pairs = [data.pair() for _ in range(400)]
    assert 0.42 < sum(label for *_, label in pairs) / 400 < 0.58
    for a, b, label in pairs[:100]:
        doc_a = next(d for d in data.documents if a in d)
        if label == 0:
            assert any(x == a and y == b for x, y in zip(doc_a, doc_a[1:], strict=False))
        else:
            assert b not in doc_a  # chapters have different animals, so a sentence can only be in its own
    batch = data.batch(8)
    assert batch["input_ids"].shape[1] <= 32
    ids, types = batch["input_ids"], batch["token_type_ids"]
    assert (ids[:, 0] == tok.cls_id).all() and types[:, 0].eq(0).all() and types.eq(1).any()
    assert ((batch["mlm_labels"] != IGNORE) <= batch["attention_mask"].bool()).all()


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
    with pytest.raises(CamelidError, match="at least two documents"):
        PretrainingData([["one.", "two."]], WordPiece.train(["one two"], vocab_size=50, min_frequency=1))
