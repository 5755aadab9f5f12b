"""fuse(model): new modules holding the reference's tensors, the same function, the same greedy tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import needs_kernels, peaked_model

from camelid.errors import CamelidError
from camelid.generate import generate
from camelid.interop.hf import save_hf_dir
from camelid.model import Attention, FeedForward, RMSNorm
from camelid.variants.fused import FastRMSNorm, FusedAttention, FusedFeedForward, fuse

PROMPT = [1, 5, 9, 42, 7, 100, 3]


def test_fuse_replaces_modules_from_outside_and_keeps_the_tensors() -> None:
    model = peaked_model()
    block = model.layers[0]
    att, ffn, wo, w2, norm_w = block.attention, block.feed_forward, block.attention.wo, block.feed_forward.w2, \
        block.attention_norm.weight
    assert fuse(model) is model
    assert type(block.attention) is FusedAttention and type(block.feed_forward) is FusedFeedForward
    assert type(block.attention_norm) is FastRMSNorm and type(model.norm) is FastRMSNorm
    assert type(att) is Attention and type(ffn) is FeedForward  # the reference modules are untouched objects
    assert block.attention.wo is wo and block.feed_forward.w2 is w2 and block.attention_norm.weight is norm_w
    torch.testing.assert_close(block.attention.wqkv.weight, torch.cat([att.wq.weight, att.wk.weight, att.wv.weight]))
    torch.testing.assert_close(block.feed_forward.w13.weight, torch.cat([ffn.w1.weight, ffn.w3.weight]))
    assert not any(type(m) in (Attention, FeedForward, RMSNorm) for m in model.modules())
    keys = list(model.state_dict())
    assert fuse(model) is model and list(model.state_dict()) == keys  # idempotent


def test_fuse_keeps_logits_and_greedy_tokens() -> None:
    model = peaked_model()
    ids = torch.tensor([PROMPT])
    before, tokens = model(ids), generate(model, PROMPT, 24)
    fused = fuse(copy.deepcopy(model))
    torch.testing.assert_close(fused(ids), before, rtol=1e-5, atol=1e-5)
    assert generate(fused, PROMPT, 24) == tokens


def test_fused_biases_are_kept() -> None:
    model = peaked_model(qkv_bias=True)
    with torch.no_grad():
        for b in model.layers:
            for lin in (b.attention.wq, b.attention.wk, b.attention.wv):
                lin.bias.normal_()
    ids = torch.tensor([PROMPT])
    want = model(ids)
    torch.testing.assert_close(fuse(model)(ids), want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("padded", [False, True])
def test_fused_layers_match_the_plain_model_through_a_cache(padded: bool) -> None:
    """Prompt (SDPA in both), then single tokens and a 3-token chunk (C++ attention in the fused model)."""
    plain = peaked_model()
    fused = fuse(copy.deepcopy(plain))
    ids = torch.randint(0, 320, (2, 20))
    key_mask = torch.ones(2, 24, dtype=torch.bool)
    if padded:
        key_mask[0, :4] = False  # sequence 0 is left-padded by 4
    chunks = [(0, 10)] + [(t, t + 1) for t in range(10, 17)] + [(17, 20)]
    with torch.no_grad():
        outs = []
        for m in (plain, fused):
            m.setup_cache(2, 24)
            kw = {"key_mask": key_mask} if padded else {}
            outs.append(torch.cat([m(ids[:, a:b], torch.arange(a, b), **kw) for a, b in chunks], dim=1))
            m.clear_cache()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_a_fused_model_cannot_be_saved_as_a_checkpoint(tmp_path) -> None:
    model = fuse(peaked_model())
    with pytest.raises(CamelidError, match="fused projections"):
        save_hf_dir(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_fused_decode_step_compiles_without_graph_breaks() -> None:
    model = fuse(peaked_model())
    model.setup_cache(1, 16)
    explanation = torch._dynamo.explain(model)(torch.tensor([[5]]), torch.tensor([3]))
    model.clear_cache()
    assert explanation.graph_break_count == 0, explanation.break_reasons
