"""Every fast path on the real default model (SmolLM2-135M-Instruct, from its GGUF): the fused C++ fp32 path,
int8/int4 weight-only, batching and speculative decoding give the plain path's greedy tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from camelid.batch import generate_batch
from camelid.generate import generate
from camelid.speculative import speculative_generate
from camelid.variants.decode_step import decode_step
from camelid.variants.fused import fuse
from camelid.variants.quantized import quantize_model

# SmolLM2's ChatML prompts (its own tokenizer, system prompt included) for three questions:
# "What is the capital of France?", "Write a haiku about camels.", "List three prime numbers."
_HEAD = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
         2, 198, 1, 4093, 198]
FRANCE = _HEAD + [1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
HAIKU = _HEAD + [19161, 253, 421, 30614, 563, 38140, 30, 2, 198, 1, 520, 9531, 198]
PRIMES = _HEAD + [6106, 1296, 9552, 2966, 30, 2, 198, 1, 520, 9531, 198]
N = 8


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    import camelid

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is steadier on a shared CI machine; the paths compared are the same
    yield camelid.load(smollm2_gguf, tokenizer=False).model.eval()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(smollm2) -> dict[str, list[int]]:
    return {name: generate(smollm2, p, N) for name, p in (("france", FRANCE), ("haiku", HAIKU), ("primes", PRIMES))}


def _dequantised(q: torch.nn.Module, base: torch.nn.Module) -> torch.nn.Module:
    ref = fuse(copy.deepcopy(base))
    qmods = dict(q.named_modules())
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, torch.nn.Linear):
            mod.weight = torch.nn.Parameter(qmods[name].dequantize().clone())
    ref.tok_embeddings.weight = torch.nn.Parameter(q.tok_embeddings.dequantize().clone())
    return ref


@pytest.mark.slow
def test_fused_cpp_fp32_path_equals_plain_model(smollm2, reference) -> None:
    fast = quantize_model(copy.deepcopy(smollm2), "fp32")
    assert generate(fast, FRANCE, N) == reference["france"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_weight_only_model_equals_its_dequantised_twin(smollm2, reference, mode: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMELID_INT8_ACTIVATIONS", "0")  # decode steps with fp32 activations: the same products
    q = quantize_model(copy.deepcopy(smollm2), mode)
    got = generate(q, FRANCE, N)
    assert got == generate(_dequantised(q, smollm2), FRANCE, N)
    if mode == "int8":  # int8 is close to fp32: the answer starts the same way (benchmarks/quality.py measures more)
        assert got[:4] == reference["france"][:4]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "int8", "int4"])
def test_cpp_decode_step_matches_the_torch_path(smollm2, mode: str) -> None:
    """The whole-model C++ step (fp32 activations) against the same fused/quantised model through torch."""
    model = quantize_model(copy.deepcopy(smollm2), mode)
    twin = copy.deepcopy(model)
    step = decode_step(model, int8_activations=False)
    assert step is not None
    with torch.inference_mode():
        for m in (model, twin):
            m.setup_cache(1, len(FRANCE) + N)
            m(torch.tensor([FRANCE]), torch.arange(len(FRANCE)))
        tok = 520
        for pos in range(len(FRANCE), len(FRANCE) + N):
            want = twin(torch.tensor([[tok]]), torch.tensor([pos]), last_only=True)
            got = step(tok, pos)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
            assert int(got.argmax()) == int(want.argmax())
            tok = int(want.argmax())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_int8_activations_keep_the_answer(smollm2, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default int8-activation step starts the answer as the fp32-activation step does (quality.py
    measures perplexity and longer agreement)."""
    q = quantize_model(copy.deepcopy(smollm2), mode)
    got = generate(q, FRANCE, N)
    monkeypatch.setenv("CAMELID_INT8_ACTIVATIONS", "0")
    assert got[:4] == generate(q, FRANCE, N)[:4]


@pytest.mark.slow
def test_batch_of_different_lengths_equals_unbatched(smollm2, reference) -> None:
    short = PRIMES[:22]
    got = generate_batch(smollm2, [FRANCE, PRIMES, short], N)
    assert got == [reference["france"], reference["primes"], generate(smollm2, short, N)]


@pytest.mark.slow
def test_speculative_with_int4_self_draft_equals_target(smollm2, reference) -> None:
    draft = quantize_model(copy.deepcopy(smollm2), "int4")
    stats = speculative_generate(smollm2, draft, HAIKU, N, k=4)
    assert stats.tokens == reference["haiku"]
    print(f"acceptance {stats.acceptance_rate:.2f} over {stats.target_passes} target passes")
    assert stats.acceptance_rate > 0.3  # an int4 copy mostly agrees with its own target
