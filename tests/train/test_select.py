"""Best-on-dev selection and early stopping (camelid.train.select.KeepBest), alone and inside the loop; the
learning-rate search of train_classifier (tune_classifier)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from camelid.classify import label_set, new_classifier
from camelid.errors import CamelidError
from camelid.train.classify import TrainArgs, classifier_config, train_classifier, tune_classifier
from camelid.train.loop import train
from camelid.train.objectives import Classification
from camelid.train.plot import read_log
from camelid.train.select import KeepBest


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Scripted:
    """An objective stand-in whose dev losses are given in advance."""

    def __init__(self, losses: list[float]) -> None:
        self.losses = list(losses)
        self.name = "scripted"

    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        return {"val_loss": self.losses.pop(0), "val_acc": 0.5}


def test_keeps_the_best_weights_and_stops_after_patience():
    model = nn.Linear(2, 2)
    frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
    model.register_parameter("frozen", frozen)
    kb = KeepBest(Scripted([3.0, 2.0, 2.5, 2.0, 9.0]), eval_interval=10, max_steps=45, patience=2)
    assert kb.name == "scripted"  # everything else is the wrapped objective's
    with pytest.raises(AttributeError):
        _ = kb.tokens
    weights = []
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(1.0)
        weights.append(model.weight.detach().clone())
        kb.evaluate(model)
        assert not kb.stop_early()
    assert kb.best_step == 20 and kb.best_loss == 2.0 and kb.since_best == 1
    with torch.no_grad():
        model.weight.add_(1.0)
    kb.evaluate(model)  # 2.0 again: not lower, so not an improvement; patience 2 is used up
    assert kb.stop_early() and kb.best_step == 20
    assert torch.equal(model.weight, weights[1])  # the weights of step 20 are back
    assert "frozen" not in kb._best  # only what trains is copied
    assert [s for s, _ in kb.history] == [10, 20, 30, 40]


def test_the_last_evaluation_restores_without_patience():
    model = nn.Linear(2, 2)
    kb = KeepBest(Scripted([1.0, float("nan"), 5.0]), eval_interval=4, max_steps=10, patience=0)
    first = model.weight.detach().clone()
    kb.evaluate(model)
    for full in (False, True):
        with torch.no_grad():
            model.weight.mul_(2.0)
        kb.evaluate(model, full=full)
        assert not kb.stop_early()
    assert torch.equal(model.weight, first) and kb.best_step == 4
    assert [s for s, _ in kb.history] == [4, 8, 10]  # the last evaluation is at max_steps


def test_the_loop_stops_when_the_objective_says_so(tiny_bert_dir, cue_examples, tmp_path):
    """Dev losses 1, 2, 3: with patience 2 the loop ends after the third evaluation, not at max_steps, and ends
    with the weights it had at the first."""
    train_set, dev = cue_examples
    clf = new_classifier(tiny_bert_dir, label_set(train_set))
    cfg = classifier_config(clf, len(train_set), TrainArgs(epochs=10, lr=1e-3, batch_size=30), tmp_path, has_dev=True)
    cfg.eval_interval = 2
    seen: list[dict[str, torch.Tensor]] = []

    def objective(cfg, device):
        inner = Classification(cfg, device, classifier=clf, train=train_set, dev=dev)
        scripted = iter([1.0, 2.0, 3.0, 4.0])
        plain = inner.evaluate

        def evaluate(model, full=False):
            seen.append({k: v.clone() for k, v in clf.state_dict().items()})
            return {**plain(model, full), "val_loss": next(scripted)}

        inner.evaluate = evaluate
        return KeepBest(inner, cfg.eval_interval, cfg.max_steps, patience=2)

    result = train(cfg, progress=False, objective=objective)
    assert cfg.max_steps == 30 and result.steps == 6
    assert [int(r["step"]) for r in read_log(tmp_path / "log.csv")] == list(range(1, 7))
    assert all(torch.equal(v, seen[0][k]) for k, v in clf.state_dict().items())
    assert not all(torch.equal(v, seen[2][k]) for k, v in clf.state_dict().items())


def test_tune_classifier_keeps_the_run_with_the_lowest_dev_loss(tiny_bert_dir, cue_examples, tmp_path):
    train_set, dev = cue_examples
    labels = label_set(train_set)
    args = TrainArgs(epochs=3, batch_size=16, patience=1)
    clf, stats = tune_classifier(lambda: new_classifier(tiny_bert_dir, labels), train_set, dev[:12],
                                 [1e-6, 3e-3], args, quiet=True, out=tmp_path)
    trials = stats["trials"]
    assert [t["lr"] for t in trials] == [1e-6, 3e-3]
    best = min(trials, key=lambda t: t["dev_loss"])
    assert stats["lr"] == best["lr"] and stats["dev_loss"] == best["dev_loss"]
    assert math.isclose(stats["train_seconds"], sum(t["train_seconds"] for t in trials))
    for t in trials:
        assert 0 < t["epochs"] <= 3
        log = read_log(tmp_path / f"lr-{t['lr']:g}" / "log.csv")
        losses = [float(r["val_loss"]) for r in log if r["val_loss"]]
        assert min(losses) == t["dev_loss"]  # the chosen epoch is the one of the lowest dev loss
    # what the classifier now computes is the chosen epoch's dev loss
    from camelid.classify import label_ids

    clf.eval()
    with torch.no_grad():
        logits = clf(clf.batch([e.text for e in dev[:12]]))
    loss = float(nn.functional.cross_entropy(logits, torch.tensor(label_ids(clf, dev[:12]))))
    assert abs(loss - stats["dev_loss"]) < 1e-5
    with pytest.raises(CamelidError, match="dev split"):
        train_classifier(new_classifier(tiny_bert_dir, labels), train_set, TrainArgs(select_on_dev=True), quiet=True)
