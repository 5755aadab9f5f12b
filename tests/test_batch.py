from __future__ import annotations

import pytest
from helpers import peaked_model

from camelid.batch import generate_batch
from camelid.errors import CamelidError
from camelid.generate import SamplingParams, generate
from camelid.variants.quantized import quantize_model

PROMPTS = [[1, 5, 9], [1, 42, 7, 100, 3, 8, 11, 2], [1], [1, 200, 13, 14, 15]]


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-llama3"])
def test_batch_equals_unbatched(name: str) -> None:
    model = peaked_model(name)
    got = generate_batch(model, PROMPTS, 16)
    assert got == [generate(model, p, 16) for p in PROMPTS]


def test_batch_with_stop_ids_and_fast_path() -> None:
    model = quantize_model(peaked_model(), "fp32")
    want = [generate(model, p, 12) for p in PROMPTS]
    stop = want[1][3]
    got = generate_batch(model, PROMPTS, 12, stop_ids=[stop])
    for w, g in zip(want, got, strict=True):
        assert g == (w[: w.index(stop) + 1] if stop in w else w)


def test_repetition_penalty_is_refused_not_ignored() -> None:
    with pytest.raises(CamelidError, match="repetition_penalty is not supported in batched generation"):
        generate_batch(peaked_model(), PROMPTS, 4, SamplingParams(repetition_penalty=1.2))
