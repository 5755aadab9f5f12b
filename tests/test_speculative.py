from __future__ import annotations

import copy

import pytest
from helpers import peaked_model

from camelid.errors import CamelidError
from camelid.generate import generate
from camelid.speculative import speculative_generate
from camelid.variants.quantized import quantize_model

PROMPT = [1, 5, 9, 42, 7, 100, 3]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_int4_self_draft_gives_target_greedy_output(k: int) -> None:
    target = peaked_model()
    draft = quantize_model(copy.deepcopy(target), "int4")
    stats = speculative_generate(target, draft, PROMPT, 30, k=k)
    assert stats.tokens == generate(target, PROMPT, 30)
    assert stats.accepted > 0  # an int4 copy agrees with its target most of the time


def test_unrelated_draft_still_exact() -> None:
    target, draft = peaked_model("tiny-gqa"), peaked_model("tiny-mqa")
    stats = speculative_generate(target, draft, PROMPT, 20, k=4)
    assert stats.tokens == generate(target, PROMPT, 20)
    assert 0 <= stats.acceptance_rate <= 1


def test_vocab_mismatch() -> None:
    with pytest.raises(CamelidError, match="vocabulary"):
        speculative_generate(peaked_model("tiny-gqa"), peaked_model("tiny-llama3"), PROMPT, 5)
