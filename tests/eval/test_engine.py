"""camelid.eval.engine: shared-prefix scoring equals scoring each request on its own with a plain forward pass,
and its windows are lm-eval's."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import peaked_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from camelid import CamelidError
from camelid.eval.engine import Request, _batches, _Piece, loglikelihood, rolling_windows
from camelid.variants.quantized import quantize_model


def reference(model: torch.nn.Module, r: Request, max_length: int) -> tuple[float, bool]:
    """Score one request alone: one causal pass over (context + continuation)[:-1], as lm-eval's hf model."""
    full = (list(r.context) + list(r.continuation))[-(max_length + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full[:-1]]))[0], dim=-1)
    n = len(r.continuation)
    target = torch.tensor(r.continuation)
    tail = logp[-n:]
    return tail[torch.arange(n), target].sum().item(), bool((tail.argmax(-1) == target).all())


def mc_like_requests(rng: random.Random, vocab: int, n_questions: int = 24) -> list[Request]:
    """Questions sharing a k-shot prefix, some sharing more of their text, each with 1-5 choices of 1-6 tokens
    (choices of one question share their first tokens sometimes)."""
    shots = [rng.randrange(vocab) for _ in range(9)]
    out = []
    previous: list[int] = []
    for _ in range(n_questions):
        q = previous[: rng.randrange(len(previous) + 1)] if previous and rng.random() < 0.5 else []
        q = q + [rng.randrange(vocab) for _ in range(rng.randrange(1, 10))]
        previous = q
        stem = [rng.randrange(vocab)]
        for _ in range(rng.randrange(1, 6)):
            tail = [rng.randrange(vocab) for _ in range(rng.randrange(0, 6))]
            out.append(Request(shots + q, (stem if rng.random() < 0.5 else []) + tail or [rng.randrange(vocab)]))
    return out


@pytest.mark.parametrize("batch_tokens,piece_tokens,pool_bytes", [(1024, 512, 512 << 20), (48, 7, 30_000)])
def test_shared_prefix_scores_equal_separate_passes(batch_tokens: int, piece_tokens: int, pool_bytes: int) -> None:
    """Small batches, short pieces and a pool too small for the whole trie (prefixes recomputed) must not
    change a score; a request longer than max_length is cut from the left, as lm-eval does."""
    model = peaked_model("tiny-gqa")
    rng = random.Random(0)
    requests = mc_like_requests(rng, model.config.vocab_size)
    requests += [Request([3] * 250, [7, 8, 9]), Request([5, 6], [1]), Request([5, 6], [2]), Request([5, 6], [1])]
    stats: dict[str, int] = {}
    got = loglikelihood(model, requests, max_length=200, batch_tokens=batch_tokens, piece_tokens=piece_tokens,
                        pool_bytes=pool_bytes, stats=stats)
    want = [reference(model, r, 200) for r in requests]
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, want, strict=True):
        assert ll == pytest.approx(ll_ref, abs=1e-4)
        assert greedy == greedy_ref
    assert stats["tokens_computed"] < stats["tokens_requested"]
    assert got[-1] == got[-3]  # the same request twice


def test_greedy_flag_is_true_for_the_greedy_continuation() -> None:
    model = peaked_model("tiny-gqa")
    context = [1, 2, 3, 4]
    with torch.no_grad():
        ids = list(context)
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    greedy = ids[len(context):]
    other = greedy[:2] + [(greedy[2] + 1) % model.config.vocab_size, greedy[3]]
    (_, is_greedy), (_, is_other_greedy) = loglikelihood(model, [Request(context, greedy), Request(context, other)])
    assert is_greedy and not is_other_greedy


def test_quantized_model_scores_equal_its_own_separate_passes() -> None:
    """int8 layers and the fused attention's C++ path for short pieces (<= 8 tokens) read the shared KV too."""
    model = quantize_model(peaked_model("tiny-gqa"), "int8")
    requests = mc_like_requests(random.Random(1), model.config.vocab_size, n_questions=10)
    got = loglikelihood(model, requests, batch_tokens=64, piece_tokens=8)
    for (ll, _), r in zip(got, requests, strict=True):
        assert ll == pytest.approx(reference(model, r, model.config.max_seq_len)[0], abs=1e-3)


def test_passes_only_read_positions_computed_before() -> None:
    """Every pass starts at or before its pieces' starts and after all positions it reads were computed."""
    rng = random.Random(2)
    pieces = [_Piece(i, s, s + rng.randrange(1, 9)) for i, s in enumerate(rng.randrange(0, 30) for _ in range(200))]
    computed_before: list[int] = []
    for start, batch in _batches(pieces, batch_tokens=64, piece_tokens=12):
        assert all(start <= p.start and p.end - start <= 12 for p in batch)
        assert len(batch) * max(p.end - start for p in batch) <= max(64, max(p.end - start for p in batch))
        computed_before.append(start)
    assert computed_before == sorted(computed_before)
    assert sorted(id(p) for _, b in _batches(pieces, 64, 12) for p in b) == sorted(id(p) for p in pieces)


@pytest.mark.parametrize("n,window,stride", [(1, 4, None), (4, 4, None), (5, 4, None), (23, 8, None), (23, 8, 3),
                                             (40, 16, 1), (17, 16, 16)])
def test_rolling_windows_are_lm_evals(n: int, window: int, stride: int | None) -> None:
    tokens = list(range(100, 100 + n))
    context_len = window - (stride or window) + 1
    want = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, window, context_len)]
    got = rolling_windows(tokens, 7, window, stride)
    assert [(list(r.context), list(r.continuation)) for r in got] == [(list(a), list(b)) for a, b in want]
    assert [t for r in got for t in r.continuation] == tokens  # every token scored exactly once


def test_bad_requests_are_one_line_errors() -> None:
    model = peaked_model("tiny-gqa")
    for bad, words in ((Request([], [1]), "non-empty context"), (Request([1], []), "non-empty context"),
                       (Request([1], [5000]), "outside the model's vocabulary"),
                       (Request([1], [2] * 300), "does not fit the context window")):
        with pytest.raises(CamelidError, match=words) as e:
            loglikelihood(model, [bad])
        assert "\n" not in str(e.value)
    with pytest.raises(CamelidError, match="stride"):
        rolling_windows([1, 2, 3], 0, 4, 5)
