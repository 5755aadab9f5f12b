"""The model against transformers.LlamaForCausalLM, same random weights: logits, KV cache, greedy tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from camelid import Llama, LlamaConfig, generate
from camelid.errors import CamelidError
from camelid.interop.hf import build_model, config_to_hf

transformers = pytest.importorskip("transformers")

# MHA / GQA / MQA, tied and untied heads, several rope_theta values, Llama 3.1 scaling, odd vocab sizes,
# and a head_dim that is not dim // n_heads.
CONFIGS = {
    "mha-untied-theta1e4": LlamaConfig.from_name("tiny-mha"),
    "gqa-tied-theta5e5": LlamaConfig.from_name("tiny-gqa", tie_embeddings=True, rope_theta=500000.0),
    "mqa-untied-theta1e6-vocab317": LlamaConfig.from_name("tiny-mqa", rope_theta=1e6, vocab_size=317),
    "llama31-scaling-tied-vocab331": LlamaConfig.from_name("tiny-llama3"),
    "gqa-head_dim32": LlamaConfig.from_name("tiny-gqa", head_dim=32, norm_eps=1e-6),
    "llama31-scaling-untied-mqa": LlamaConfig.from_name(
        "tiny-llama3", n_kv_heads=1, tie_embeddings=False, rope_theta=10000.0
    ),
}


def hf_twin(cfg: LlamaConfig) -> tuple[torch.nn.Module, Llama]:
    """A random transformers model and a camelid model holding the very same weights."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg))).eval()
    # spread the norms away from 1.0 so that a swapped norm would show
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ours = build_model(cfg, dict(hf.state_dict()), source="test").eval()
    return hf, ours


@pytest.fixture(params=list(CONFIGS), scope="module")
def twins(request: pytest.FixtureRequest) -> tuple[LlamaConfig, torch.nn.Module, Llama]:
    torch.manual_seed(1234)
    cfg = CONFIGS[request.param]
    hf, ours = hf_twin(cfg)
    return cfg, hf, ours


def test_logits_match_transformers(twins) -> None:
    cfg, hf, ours = twins
    ids = torch.randint(0, cfg.vocab_size, (3, 77))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == (3, 77, cfg.vocab_size) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_kv_cache_decoding_equals_full_forward(twins) -> None:
    cfg, _, ours = twins
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        full = ours(ids)
        ours.setup_cache(2, 48)
        steps = [ours(ids[:, :17], torch.arange(17))]
        steps += [ours(ids[:, t : t + 1], torch.tensor([t])) for t in range(17, 40)]
        ours.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_32_greedy_tokens_match_transformers_generate(twins) -> None:
    cfg, hf, ours = twins
    prompt = torch.randint(0, cfg.vocab_size, (1, 9))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    mask = torch.ones_like(prompt)  # explicit: otherwise transformers masks prompt tokens equal to pad_token_id
    expected = hf.generate(prompt, attention_mask=mask, max_new_tokens=32, do_sample=False)[0, 9:].tolist()
    got = generate(ours, prompt[0].tolist(), max_new_tokens=32)
    assert len(got) == 32
    assert got == expected


def test_last_only_matches_last_position() -> None:
    model = Llama(LlamaConfig.from_name("tiny-gqa")).eval()
    ids = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True), model(ids)[:, -1:])


@settings(max_examples=15, deadline=None)
@given(split=st.integers(1, 30), length=st.integers(2, 31), batch=st.integers(1, 3))
def test_prefill_split_anywhere_gives_same_logits(split: int, length: int, batch: int) -> None:
    torch.manual_seed(0)
    model = _small_model()
    split = min(split, length - 1)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(batch, 32)
        a = model(ids[:, :split], torch.arange(split))
        b = model(ids[:, split:], torch.arange(split, length))
        model.clear_cache()
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-5, rtol=0)


_CACHED: dict[str, Llama] = {}


def _small_model() -> Llama:
    if "m" not in _CACHED:
        torch.manual_seed(0)
        _CACHED["m"] = Llama(LlamaConfig.from_name("tiny-mqa")).eval()
    return _CACHED["m"]


def test_decode_step_compiles_without_graph_breaks() -> None:
    model = Llama(LlamaConfig.from_name("tiny-gqa")).eval()
    model.setup_cache(1, 16)
    token, pos = torch.tensor([[5]]), torch.tensor([3])
    explanation = torch._dynamo.explain(model)(token, pos)
    model.clear_cache()
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_init_is_llama_style() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig.from_name("tiny-mha", dim=256, n_layers=8, intermediate_size=512)
    model = Llama(cfg)
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].attention.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.all(model.norm.weight == 1)


def test_tied_head_shares_storage_and_counts_once() -> None:
    cfg = LlamaConfig.from_name("tiny-gqa", tie_embeddings=True)
    model = Llama(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    untied = Llama(cfg.replace(tie_embeddings=False))
    assert untied.num_params() - model.num_params() == cfg.vocab_size * cfg.dim


@pytest.mark.parametrize("changes", [{}, {"tie_embeddings": False}, {"qkv_bias": True}, {"head_dim": 12}])
def test_num_params_counts_the_tensors_and_survives_fusing_and_quantising(changes: dict) -> None:
    from camelid.variants.fused import fuse
    from camelid.variants.quantized import quantize_model

    cfg = LlamaConfig.from_name("tiny-gqa", **changes)
    model = Llama(cfg)
    tensors = sum(p.numel() for p in model.parameters())  # a tied head is one Parameter
    assert model.num_params() == tensors
    assert model.num_params(exclude_embeddings=True) == tensors - cfg.vocab_size * cfg.dim
    fuse(model)
    assert model.num_params() == tensors
    assert quantize_model(Llama(cfg), "int8").num_params() == tensors


def test_too_long_input_and_missing_cache_are_clear_errors() -> None:
    model = Llama(LlamaConfig.from_name("tiny-gqa", max_seq_len=16))
    with pytest.raises(CamelidError, match="exceeds the context window of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(CamelidError, match="setup_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(CamelidError, match="12 tokens plus 8 new tokens exceeds the context window of 16"):
        generate(model, list(range(12)), max_new_tokens=8)


def test_rows_at_different_positions_decode_as_they_would_alone() -> None:
    """Continuous batching: per-row positions [B, T] (each row writes its own cache slots and sees only its own
    past) give every row the logits of its sequence run alone."""
    torch.manual_seed(0)
    model = _small_model()
    x, y = torch.randint(0, 320, (1, 10)), torch.randint(0, 320, (1, 7))
    with torch.no_grad():
        want_x, want_y = model(x)[0], model(y)[0]
        model.setup_cache(2, 16)
        # prefill rows of different lengths in one pass: row 1's 3 filler tokens go to slots 13-15, which its
        # later queries never see (only slots <= their position) until they are overwritten
        ids = torch.cat([x[:, :6], torch.cat([y[:, :3], torch.zeros(1, 3, dtype=torch.long)], 1)])
        positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 13, 14, 15]])
        out = model(ids, positions)
        got_x, got_y = [out[0]], [out[1, :3]]
        for t in range(4):  # then row 0 at positions 6..9 while row 1 is at 3..6
            step = model(torch.stack([x[:, 6 + t], y[:, 3 + t]]), torch.tensor([[6 + t], [3 + t]]))
            got_x.append(step[0])
            got_y.append(step[1])
        model.clear_cache()
    torch.testing.assert_close(torch.cat(got_x), want_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(got_y), want_y, atol=1e-5, rtol=0)


def test_an_explicit_mask_packs_sequences_into_one_row() -> None:
    """Two sequences in one row, positions restarting at 0 and a block-diagonal causal mask: the logits of each
    sequence alone (no cache); with a cache, the same mask shape [B, 1, T, S] replaces the causal one."""
    torch.manual_seed(0)
    model = _small_model()
    a, b = torch.randint(0, 320, (1, 5)), torch.randint(0, 320, (1, 9))
    doc = torch.tensor([0] * 5 + [1] * 9)
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(14, 14, dtype=torch.bool).tril())[None, None]
    positions = torch.cat([torch.arange(5), torch.arange(9)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), positions, mask=mask)[0]
        torch.testing.assert_close(packed, torch.cat([model(a)[0], model(b)[0]]), atol=1e-5, rtol=0)
        model.setup_cache(1, 16)
        cached = model(torch.cat([a, b], 1), torch.arange(14), mask=torch.nn.functional.pad(mask, (0, 2)))[0]
        model.clear_cache()
    torch.testing.assert_close(cached[:5], model(a)[0], atol=1e-5, rtol=0)
    # b sits at positions 5..13 here: RoPE sees only position differences, so the same logits up to rounding
    torch.testing.assert_close(cached[5:], model(b)[0], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_greedy_tokens() -> None:
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name("tiny-gqa")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)  # peaked logits: no near-ties for float rounding to flip
    prompt = [1, 5, 9, 42, 7]
    want = generate(model, prompt, 20)
    assert generate(model, prompt, 20, compile=True) == want
    assert generate(model, prompt[:3], 20, compile=True) == generate(model, prompt[:3], 20)  # reuses the compile
