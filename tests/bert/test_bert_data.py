"""BERT's pre-training data: sentence splitting, NSP pairs, and the 80/10/10 masking statistics."""

from __future__ import annotations

import pytest
import torch
from bert_corpus import synthetic_text

from camelid import CamelidError
from camelid.bert.data import PretrainingData, mask_tokens, split_sentences
from camelid.bert.model import IGNORE
from camelid.tokenizer.wordpiece import WordPiece


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


def test_nsp_needs_two_documents():
    with pytest.raises(CamelidError, match="at least two documents"):
        PretrainingData([["one.", "two."]], WordPiece.train(["one two"], vocab_size=50, min_frequency=1))
