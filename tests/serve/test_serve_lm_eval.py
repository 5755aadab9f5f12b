"""lm-eval's `local-completions` model against a live `camelid serve`: its log-likelihoods (from the echoed prompt
log-probabilities) equal the model's own, and greedy generation requests come back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from serve_helpers import Server

PAIRS = [("It was a fine morning, and Emma", " walked to the village"),
         ("Mr. Knightley said", " that she was right"),
         ("Harriet", " smiled")]


def test_local_completions_loglikelihood_equals_the_models_own(tiny_server: Server, tiny_model: Path) -> None:
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    import camelid

    lm = LocalCompletionsAPI(model="tiny", base_url=f"{tiny_server.url}/v1/completions", tokenizer=str(tiny_model),
                             tokenizer_backend="huggingface", tokenized_requests=True, num_concurrent=1,
                             max_retries=1, max_length=256)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    model = camelid.load(tiny_model, tokenizer=False).model
    for (context, continuation), (logprob, _greedy) in zip(PAIRS, got, strict=True):
        n = len(lm.tok_encode(context))
        ids = lm.tok_encode(context + continuation)
        assert 0 < n < len(ids)
        with torch.no_grad():
            logits = F.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
        want = sum(float(logits[j - 1, ids[j]]) for j in range(n, len(ids)))
        assert logprob == pytest.approx(want, abs=1e-4)
