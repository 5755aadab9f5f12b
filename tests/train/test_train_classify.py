"""A classifier's fine-tuning through the training loop: its batches, exact resume (dropout included), the probe's
dev scores and export."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from camelid.classify import evaluate_classifier, label_set, load_classifier, new_classifier
from camelid.train.classify import TrainArgs, classifier_config, train_classifier
from camelid.train.objectives import Classification
from camelid.train.plot import read_log


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_every_example_once_per_epoch_and_batches_from_seed_step_index(tiny_bert_dir, cue_examples, tmp_path):
    train, _ = cue_examples
    clf = new_classifier(tiny_bert_dir, label_set(train))
    args = TrainArgs(epochs=3, batch_size=8, seed=5)
    cfg = classifier_config(clf, len(train), args, tmp_path)
    assert cfg.max_steps == 34  # ceil(3 epochs x 90 / 8)
    objective = Classification(cfg, torch.device("cpu"), classifier=clf, train=train)
    stream = [i for step in range(cfg.max_steps) for i in objective.indices(step, 0)]
    for epoch in range(3):
        assert sorted(stream[90 * epoch:90 * (epoch + 1)]) == list(range(90))
    assert stream[:90] != stream[90:180]  # each epoch in its own order
    # micro-batches depend on (seed, step, index) alone: a fresh objective, asked out of order, agrees
    again = Classification(cfg, torch.device("cpu"), classifier=clf, train=train)
    assert again.indices(20, 0) == objective.indices(20, 0)
    x, y = again.batch(3, 0)
    assert torch.equal(x["input_ids"], objective.batch(3, 0)[0]["input_ids"]) and y.tolist() == [
        label_set(train).index(train[i].label) for i in objective.indices(3, 0)]
    # two micro-batches per step take the same examples as one of twice the size
    halves = classifier_config(clf, len(train), TrainArgs(batch_size=4, seed=5), tmp_path)
    halves.grad_accum = 2
    split = Classification(halves, torch.device("cpu"), classifier=clf, train=train)
    assert split.indices(7, 0) + split.indices(7, 1) == objective.indices(7, 0)


def test_resume_from_a_checkpoint_matches_the_uninterrupted_run(tiny_bert_dir, cue_examples, tmp_path):
    """Stopped at step 8 of 12 and resumed: the same losses, learning rates and gradient norms bit for bit, and
    the same final weights, with dropout on (its masks are drawn from (seed, step, index) too)."""
    train, _ = cue_examples
    args = TrainArgs(epochs=1, lr=1e-3, batch_size=8, seed=3, checkpoint_interval=4)

    def classifier():
        torch.manual_seed(0)
        clf = new_classifier(tiny_bert_dir, label_set(train))
        for m in clf.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.1
        return clf

    train_classifier(classifier(), train, args, quiet=True, out=tmp_path / "ref")
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step-000008", tmp_path / "cut" / "checkpoints" / "step-000008")
    (tmp_path / "cut" / "checkpoints" / "latest").write_text("step-000008\n")
    shutil.copyfile(tmp_path / "ref" / "log.csv", tmp_path / "cut" / "log.csv")  # rows past step 8 are dropped
    train_classifier(classifier(), train, args, quiet=True, out=tmp_path / "cut", resume=True)
    compared = ("step", "loss", "lr", "grad_norm")
    ref, got = ([{k: r[k] for k in compared} for r in read_log(tmp_path / d / "log.csv")] for d in ("ref", "cut"))
    assert len(ref) == 12 and got == ref
    a, b = (load_file(tmp_path / d / "checkpoints" / "step-000012" / "model.safetensors") for d in ("ref", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and dropout did act: without it the same run takes other steps
    torch.manual_seed(0)
    plain = new_classifier(tiny_bert_dir, label_set(train))
    train_classifier(plain, train, TrainArgs(epochs=1, lr=1e-3, batch_size=8, seed=3), quiet=True, out=tmp_path / "p")
    assert [r["loss"] for r in read_log(tmp_path / "p" / "log.csv")][1:] != [r["loss"] for r in ref][1:]


def test_probe_scores_the_dev_set_and_exports_a_classifier(tiny_llama_dir, cue_examples, tmp_path):
    train, dev = cue_examples
    clf = new_classifier(tiny_llama_dir, label_set(train))
    stats = train_classifier(clf, train, TrainArgs(mode="probe", epochs=10, batch_size=16), quiet=True, dev=dev,
                             out=tmp_path / "run", export_dir=tmp_path / "clf", backbone_source=str(tiny_llama_dir))
    assert stats["steps"] == 57 and stats["mode"] == "probe" and stats["lr"] == 1e-2
    rows = read_log(tmp_path / "run" / "log.csv")
    assert [r["step"] for r in rows if r["val_acc"]] == ["57"]  # evaluated once, at the end
    # the loop's dev score is the classifier's own accuracy on those examples
    assert stats["dev_accuracy"] == evaluate_classifier(clf, dev)["accuracy"] == float(rows[-1]["val_acc"])
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    again = load_classifier(tmp_path / "clf")  # the export names its backbone instead of copying it
    assert not (tmp_path / "clf" / "backbone").exists()
    assert again.predict([e.text for e in dev]) == clf.predict([e.text for e in dev])


def test_lora_mode_trains_adapters_and_head_and_saves_merged(tiny_llama_dir, tiny_bert_dir, cue_examples, tmp_path):
    from camelid.errors import CamelidError
    from camelid.variants.lora import lora_modules

    train, test = cue_examples
    labels = label_set(train)
    clf = new_classifier(tiny_llama_dir, labels, 64)
    base = {k: v.clone() for k, v in clf.model.state_dict().items()}
    stats = train_classifier(clf, train, TrainArgs(mode="lora", epochs=2, lr=3e-3, batch_size=16, lora_rank=2),
                             quiet=True, out=tmp_path / "run", export_dir=tmp_path / "clf",
                             backbone_source=str(tiny_llama_dir))
    # rank 2 on 7 linears of 2 blocks (dim 64, hidden 176), and the head (64 x 3 + 3)
    assert stats["params_trainable"] == 2 * 2 * (4 * (64 + 64) + 3 * (64 + 176)) + 64 * 3 + 3
    assert not lora_modules(clf.model)  # the export merged the adapters into plain linears
    merged = clf.model.state_dict()
    assert any(not torch.equal(merged[k], base[k]) for k in base if k.endswith(".wq.weight"))
    assert all(torch.equal(merged[k], base[k]) for k in base if "norm" in k or "tok_embeddings" in k)
    again = load_classifier(tmp_path / "clf")
    texts = [e.text for e in test]
    assert again.predict(texts) == clf.predict(texts)
    with pytest.raises(CamelidError, match="mode lora adapts a LLaMA backbone"):
        train_classifier(new_classifier(tiny_bert_dir, labels), train, TrainArgs(mode="lora"), quiet=True)
