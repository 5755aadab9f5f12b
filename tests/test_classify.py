"""Classification heads on both families: pooling against transformers, training, probe vs finetune, save/load, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from classify_helpers import CUES, synthetic_examples

from camelid import CamelidError
from camelid.classify import (
    BertClassifier,
    LlamaClassifier,
    classification_metrics,
    evaluate_classifier,
    label_set,
    load_classifier,
    new_classifier,
    read_jsonl,
    save_classifier,
    train_test_split,
)
from camelid.cli import main
from camelid.train.classify import TrainArgs, train_classifier


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine threads fight each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(cue_examples):
    return cue_examples


def test_read_jsonl_and_split(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": "x", "split": "train"}\n{"text": "b", "label": "y", "split": "test"}\n')
    train, test = train_test_split(read_jsonl(f))
    assert [e.text for e in train] == ["a"] and [e.text for e in test] == ["b"]
    examples = synthetic_examples(60, 3)
    train, test = train_test_split(examples, test_fraction=0.2)
    assert len(test) == 12 and {e.label for e in test} == set(CUES)  # stratified
    assert not {id(e) for e in train} & {id(e) for e in test}
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b"\n')
    with pytest.raises(CamelidError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl(f)
    f.write_text('{"txt": "a", "label": "x"}\n')
    with pytest.raises(CamelidError, match=r"d.jsonl:1: each line needs"):
        read_jsonl(f)


def test_metrics_by_hand():
    # class 0: tp 2 fp 1 fn 0 -> F1 0.8; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: never seen -> 0
    m = classification_metrics([0, 0, 1, 1], [0, 0, 1, 0], 3)
    assert m["accuracy"] == 0.75 and abs(m["macro_f1"] - (0.8 + 2 / 3 + 0) / 3) < 1e-12


def test_llama_last_token_pooling_matches_transformers(tiny_llama_dir):
    """Our head on the last real token = transformers' LlamaForSequenceClassification (right padding)."""
    clf = new_classifier(tiny_llama_dir, ["a", "b", "c"])
    assert isinstance(clf, LlamaClassifier)
    with torch.no_grad():
        clf.head.bias.zero_()  # HF's score layer has no bias
    ref = transformers.LlamaForSequenceClassification.from_pretrained(str(tiny_llama_dir), num_labels=3,
                                                                      pad_token_id=0).eval()
    with torch.no_grad():
        ref.score.weight.copy_(clf.head.weight)
        batch = clf.batch(["the room was good", "bad", "the food and staff were really quite average overall"])
        assert len(set(batch["last"].tolist())) == 3  # three lengths: two of the rows are padded
        expected = ref(input_ids=batch["input_ids"]).logits
        got = clf.eval()(batch)
    assert (got - expected).abs().max() < 1e-5


# A 2-layer BERT from random weights, fine-tuned on 90 examples, usually finds all three cue-word classes (test
# accuracy 1.0), but from some initialisations it stays on a plateau with two classes merged (accuracy 2/3): over
# 50 random backbones, 2 did at 40 epochs and lr 3e-3, 2 in 12 at 25 epochs and lr 1e-3, and which ones changes
# with the CPU's float rounding. So the tests ask for what every correct run gives, learning well above chance:
# 0.6 on 30 test examples is 18 right, which a model that learned nothing (1 in 3) reaches with probability 0.002.
BERT_EPOCHS, BERT_LR, ABOVE_CHANCE = 40, 2e-3, 0.6


def test_bert_finetune_learns_saves_and_loads_in_transformers(tiny_bert_dir, data, tmp_path):
    train, test = data
    clf = new_classifier(tiny_bert_dir, label_set(train))
    assert isinstance(clf, BertClassifier)
    stats = train_classifier(clf, train, TrainArgs(mode="finetune", epochs=BERT_EPOCHS, lr=BERT_LR, batch_size=8),
                             quiet=True)
    assert stats["params_trainable"] == stats["params_total"]
    result = evaluate_classifier(clf, test)
    assert result["accuracy"] >= ABOVE_CHANCE, result
    assert result["latency_ms"] > 0 and result["throughput_per_s"] > 0
    out = save_classifier(clf, tmp_path / "clf")
    again = load_classifier(out)
    assert again.predict([e.text for e in test]) == clf.predict([e.text for e in test])
    # the folder is a transformers BertForSequenceClassification with our labels
    ref = transformers.BertForSequenceClassification.from_pretrained(str(out)).eval()
    batch = clf.batch([e.text for e in test])
    with torch.no_grad():
        assert (ref(**batch).logits - clf(batch)).abs().max() < 1e-5
    assert [ref.config.id2label[i] for i in range(3)] == clf.labels
    # a fine-tuned classifier is a starting point for another label set: encoder kept, new head
    other = new_classifier(out, ["yes", "no"])
    assert other.head.out_features == 2
    assert torch.equal(other.model.bert.layers[0].attention.wq.weight, clf.model.bert.layers[0].attention.wq.weight)


def test_llama_probe_freezes_the_backbone(tiny_llama_dir, data, tmp_path):
    train, test = data
    clf = new_classifier(tiny_llama_dir, label_set(train))
    before = {k: v.clone() for k, v in clf.model.state_dict().items()}
    head_before = clf.head.weight.clone()
    stats = train_classifier(clf, train, TrainArgs(mode="probe", epochs=30, batch_size=16), quiet=True)
    assert stats["params_trainable"] == clf.head.weight.numel() + clf.head.bias.numel()
    assert all(torch.equal(v, clf.model.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(head_before, clf.head.weight)
    acc = evaluate_classifier(clf, train)["accuracy"]
    assert acc > 0.5  # a random 2-layer backbone still separates the cue words linearly, if imperfectly
    # a probed classifier stores only its head and points at its backbone
    out = save_classifier(clf, tmp_path / "probe", backbone_source=str(tiny_llama_dir), mode="probe")
    assert not (out / "backbone").exists()
    assert load_classifier(out).predict([e.text for e in test]) == clf.predict([e.text for e in test])


def test_llama_finetune_learns_and_round_trips(tiny_llama_dir, data, tmp_path):
    """A random 2-layer LLaMA fine-tuned on 90 examples fits them, and finds the cue words well above chance.

    What a correct implementation does on any CPU, not one machine's rounding: it fits the training set (final
    loss about 0.005 from ln 3 = 1.1, every training example right, for each of 10 seeds); its test accuracy
    is 0.77 to 0.97 over those seeds (a small model fitted to 90 examples generalises by luck of the draw).
    0.6 on 30 test examples is 18 right, which a model that learned nothing (chance: 1 in 3) reaches with
    probability 0.002."""
    train, test = data
    clf = new_classifier(tiny_llama_dir, label_set(train))
    stats = train_classifier(clf, train, TrainArgs(mode="finetune", epochs=15, lr=3e-3, batch_size=8), quiet=True)
    assert stats["final_loss"] < 0.1, stats
    assert evaluate_classifier(clf, train)["accuracy"] >= 0.95
    result = evaluate_classifier(clf, test)
    assert result["accuracy"] >= 0.6, result
    out = save_classifier(clf, tmp_path / "ft", mode="finetune")
    assert (out / "backbone" / "config.json").is_file()
    again = load_classifier(out)
    assert [again.labels[i] for i in again.predict([e.text for e in test])] == result["predictions"]


def cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_cli_train_eval_predict(tiny_bert_dir, data, tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    rows = [{"text": e.text, "label": e.label, "split": "train"} for e in data[0]]
    rows += [{"text": e.text, "label": e.label, "split": "test"} for e in data[1]]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clf"
    assert cli("classify", "train", "--data", str(f), "--model", str(tiny_bert_dir), "--out", str(out),
               "--epochs", str(BERT_EPOCHS), "--lr", str(BERT_LR), "--batch-size", "8") == 0
    printed = capsys.readouterr().out
    trained = json.loads(printed[printed.index("{\n"):printed.rindex("test accuracy")])["test"]
    assert cli("classify", "eval", "--model", str(out), "--data", str(f)) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 30 and result["accuracy"] >= ABOVE_CHANCE, result
    assert result["accuracy"] == trained["accuracy"]  # the saved classifier is the one that was trained
    texts = ["a lovely room", "an awful hotel", "the food was okay"]
    assert cli("classify", "predict", "--model", str(out), *texts) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    clf = load_classifier(out)
    assert [x["label"] for x in lines] == [clf.labels[i] for i in clf.predict(texts)]
    assert cli("classify", "eval", "--model", str(tmp_path), "--data", str(f)) == 1
    assert "no classifier.json" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_probe_on_snips_intents(minilm_dir):
    """The real all-MiniLM-L6-v2 with a frozen backbone: a linear head on [CLS] features finds the intents."""
    from pathlib import Path

    from camelid.compare import _stratified_head

    examples = read_jsonl(Path(__file__).parents[1] / "data" / "classification" / "intent_snips.jsonl")
    train, test = train_test_split(examples)
    assert (len(train), len(test)) == (556, 68)  # the file's own split
    clf = new_classifier(minilm_dir, label_set(examples))
    stats = train_classifier(clf, _stratified_head(train, 140), TrainArgs(mode="probe", epochs=30), quiet=True)
    assert stats["params_trainable"] == 384 * 7 + 7
    result = evaluate_classifier(clf, test)
    majority = max(sum(e.label == lab for e in test) for lab in clf.labels) / len(test)
    assert result["accuracy"] > max(0.7, majority + 0.4), result
