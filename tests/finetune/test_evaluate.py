"""The demo's scores: ROUGE-L against Google's rouge-score package, exact match as Super-NaturalInstructions
normalises answers."""

from __future__ import annotations

import pytest

from camelid.finetune.evaluate import exact_match, normalize_answer, rouge_l, score

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score is not installed")

PAIRS = [
    ("The cat sat on the mat.", "the cat is on the mat"),
    ("positive", "Positive"),
    ("Yes, it is. Yes!", "yes"),
    ("", "anything"),
    ("nothing in common", "other words entirely"),
    ("A B C D E F", "F E D C B A"),
    ("don't stop-me now 42", "dont stop me now, 42!"),
    ("Überraschung café", "cafe Uberraschung"),
    ("the the the", "the"),
]


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_rouge_l_equals_rouge_score(prediction: str, reference: str) -> None:
    theirs = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False).score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(theirs, abs=1e-12)


def test_exact_match_ignores_case_punctuation_articles_and_spacing() -> None:
    assert normalize_answer("  The  Answer, is: A cat! ") == "answer is cat"
    assert exact_match("The answer.", "answer") == 1.0
    assert exact_match("Positive", "positive ") == 1.0
    assert exact_match("positive sentiment", "positive") == 0.0
    assert score(["Yes", "no", "maybe"], ["yes", "yes", "maybe so"]) == pytest.approx(
        {"exact_match": 1 / 3, "rouge_l": (1 + 0 + 2 * 1 * 0.5 / 1.5) / 3, "examples": 3.0})
