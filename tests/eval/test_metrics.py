"""camelid.eval.metrics against the implementations lm-eval and Google's rouge_score use."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rouge_score import rouge_scorer

from camelid.eval.metrics import bits_per_byte, exact_match, multiple_choice, rouge_l
from camelid.eval.tasks import read_instructions, resolve_tasks


def test_rouge_l_equals_rouge_score() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    (task,) = resolve_tasks(["natural_instructions"])
    examples = read_instructions(task.path)[:300]
    rng = random.Random(0)
    pairs = [(e.output, examples[rng.randrange(len(examples))].output) for e in examples]
    pairs += [(e.output[: len(e.output) // 2], e.output) for e in examples[:50]]
    pairs += [("", "x"), ("The Cat, the hat!", "the cat sat on THE hat"), ("a b c", "c b a"), ("?!", "...")]
    for prediction, reference in pairs:
        want = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l(prediction, reference) == pytest.approx(want, abs=1e-12), (prediction, reference)


def test_multiple_choice_metrics_are_lm_evals() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        choices = ["".join(rng.choice(list("abcé "), size=rng.integers(1, 12))) for _ in range(rng.integers(2, 6))]
        lls = list(rng.normal(-10, 3, len(choices)).round(1))  # rounding makes ties
        answer = int(rng.integers(len(choices)))
        got = multiple_choice(lls, choices, answer)
        assert got["acc"] == float(np.argmax(lls) == answer)
        assert got["acc_norm"] == float(np.argmax(np.array(lls) / np.array([len(c) for c in choices])) == answer)
        assert got["acc_bytes"] == float(
            np.argmax(np.array(lls) / np.array([len(c.encode()) for c in choices])) == answer)


def test_small_metrics() -> None:
    assert bits_per_byte(-8 * np.log(2), 8) == pytest.approx(1.0)
    assert exact_match(" Paris\n", "Paris") == 1.0 and exact_match("paris", "Paris") == 0.0
