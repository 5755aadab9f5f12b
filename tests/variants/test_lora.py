"""LoRA from outside the reference: a fresh adapter is the base exactly, merging is exact, and the forward pass
and gradients equal peft's on the same weights; QLoRA's quantised base trains without keeping fp32 weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from camelid import Llama, LlamaConfig
from camelid.errors import CamelidError
from camelid.interop.hf import build_model, config_to_hf
from camelid.interop.peft import HF_TARGETS, hf_module_name
from camelid.variants.fused import fuse
from camelid.variants.lora import (
    TARGETS,
    LoRALinear,
    LoraSpec,
    apply_lora,
    lora_disabled,
    lora_modules,
    lora_spec,
    merge_lora,
    quantize_base,
    quantize_head,
    save_adapter,
    trainable_parameters,
)
from camelid.variants.quantized import Int4Linear, Int8Linear
from camelid.variants.training import TrainLlama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIGS = {
    "gqa-tied": LlamaConfig.from_name("tiny-gqa"),
    "mha-untied": LlamaConfig.from_name("tiny-mha", tie_embeddings=False),
}


def randomize_adapters(model: nn.Module, std: float = 0.1) -> None:
    """A trained-looking adapter: B away from its zero init (so the adapter changes the function)."""
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(0, std)


def twins(cfg: LlamaConfig) -> tuple[nn.Module, Llama]:
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg))).eval()
    return hf, build_model(cfg, dict(hf.state_dict()), source="test").eval()


def test_targets_are_the_peft_names_in_order() -> None:
    assert list(HF_TARGETS) == list(TARGETS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_fresh_adapter_is_exactly_the_base(name: str) -> None:
    torch.manual_seed(0)
    base = Llama(CONFIGS[name]).eval()
    lora = apply_lora(copy.deepcopy(base), rank=4, alpha=8)
    x = torch.randint(0, base.config.vocab_size, (2, 24))
    assert torch.equal(lora(x), base(x))  # B = 0: not close, equal
    assert len(lora_modules(lora)) == len(TARGETS) * base.config.n_layers
    assert not any(isinstance(m, LoRALinear) for m in [lora.output, lora.tok_embeddings])  # never the head


def test_base_weights_are_frozen_and_untouched_by_training() -> None:
    torch.manual_seed(0)
    model = apply_lora(Llama(LlamaConfig.from_name("tiny-gqa")), rank=2)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 320, (2, 16))
    for _ in range(3):
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{p}.lora_{ab}" for p in lora_modules(model) for ab in "ab"}
    trainable, total = trainable_parameters(model)
    assert trainable == sum(m.lora_a.numel() + m.lora_b.numel() for m in lora_modules(model).values())
    assert total == model.config.num_params() + trainable


@pytest.mark.parametrize("spec", [LoraSpec(4, 8), LoraSpec(3, 5.0, targets=["wq", "wv", "w2"], rslora=True)],
                         ids=["all", "some-rslora"])
def test_merged_equals_unmerged(spec: LoraSpec) -> None:
    torch.manual_seed(0)
    model = apply_lora(Llama(LlamaConfig.from_name("tiny-gqa")).eval(), spec)
    randomize_adapters(model)
    x = torch.randint(0, 320, (2, 24))
    unmerged = model(x)
    merged_model = merge_lora(copy.deepcopy(model))
    assert not lora_modules(merged_model)
    assert set(merged_model.state_dict()) == set(Llama(model.config).state_dict())  # the reference's names again
    assert (merged_model(x) - unmerged).abs().max().item() < 1e-5
    with lora_disabled(model):  # and off again: the base
        base = model(x)
    assert (base - unmerged).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_gradients_equal_peft(name: str, tmp_path) -> None:
    """The same base weights and adapter in transformers + peft and in camelid: logits and every adapter
    gradient agree to 1e-5."""
    torch.manual_seed(1)
    cfg = CONFIGS[name]
    hf, ours = twins(cfg)
    apply_lora(ours, rank=4, alpha=8, targets=["wq", "wk", "wv", "wo", "w1", "w3", "w2"])
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    y = torch.randint(0, cfg.vocab_size, (2, 20))
    a, b = ours(x), theirs(x).logits
    assert (a - b).abs().max().item() < 1e-5
    nn.functional.cross_entropy(a.flatten(0, 1), y.flatten()).backward()
    nn.functional.cross_entropy(b.flatten(0, 1), y.flatten()).backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * len(lora_modules(ours))
    for path, m in lora_modules(ours).items():
        for ab in "ab":
            g = grads[f"base_model.model.{hf_module_name(path)}.lora_{ab.upper()}.default.weight"]
            assert (getattr(m, f"lora_{ab}").grad - g).abs().max().item() < 1e-5, (path, ab)


def test_lora_over_the_training_model_equals_the_reference() -> None:
    """The fast training model (C++ kernels where built) with LoRA computes the reference's loss and gradients."""
    torch.manual_seed(0)
    base = Llama(LlamaConfig.from_name("tiny-gqa"))
    fast = TrainLlama.from_model(copy.deepcopy(base))
    torch.manual_seed(1)
    ref = apply_lora(base, rank=4)
    torch.manual_seed(1)
    apply_lora(fast, rank=4)
    randomize_adapters(ref)
    for a, b in zip(lora_modules(ref).values(), lora_modules(fast).values(), strict=True):
        b.lora_b.data.copy_(a.lora_b)
    x, y = torch.randint(0, 320, (2, 32)), torch.randint(0, 320, (2, 32))
    loss_ref = nn.functional.cross_entropy(ref(x).flatten(0, 1), y.flatten())
    loss_fast = fast(x, targets=y)
    assert abs(loss_ref.item() - loss_fast.item()) < 1e-5
    loss_ref.backward()
    loss_fast.backward()
    for (n, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        if p.requires_grad:
            assert (p.grad - q.grad).abs().max().item() < 1e-5, n


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_trains_through_a_quantised_base_without_keeping_fp32_weights(mode: str) -> None:
    """LoRA over Int8Linear/Int4Linear: the same loss and adapter gradients as LoRA over nn.Linear holding the
    dequantised weights, and autograd saves no weight-sized fp32 tensor for the backward pass."""
    torch.manual_seed(0)
    cfg = LlamaConfig.from_name("tiny-gqa")
    q = quantize_base(Llama(cfg), mode)
    kinds = {type(m) for m in q.modules() if isinstance(m, Int8Linear | Int4Linear)}
    # int4 where the input width is a multiple of 32 (w2's 176 is not: int8 there)
    assert kinds == ({Int8Linear} if mode == "int8" else {Int4Linear, Int8Linear})
    deq = copy.deepcopy(q)
    for block in deq.layers:  # the same weights, dequantised into plain linears
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if isinstance(child, Int8Linear | Int4Linear):
                    lin = nn.Linear(child.in_features, child.out_features, bias=False)
                    lin.weight = nn.Parameter(child.dequantize(), requires_grad=False)
                    setattr(parent, name, lin)
    torch.manual_seed(5)
    apply_lora(q, rank=4)
    torch.manual_seed(5)
    apply_lora(deq, rank=4)
    randomize_adapters(q)
    for a, b in zip(lora_modules(q).values(), lora_modules(deq).values(), strict=True):
        b.lora_b.data.copy_(a.lora_b)
    x = torch.randint(0, 320, (2, 24))
    big = {m.in_features * m.out_features for m in lora_modules(q).values()}
    saved_shapes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.float32 and t.dim() == 2:
            saved_shapes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_q = q(x).logsumexp(-1).mean()
    loss_d = deq(x).logsumexp(-1).mean()
    assert abs(loss_q.item() - loss_d.item()) < 1e-5
    loss_q.backward()
    loss_d.backward()
    for a, b in zip(lora_modules(q).values(), lora_modules(deq).values(), strict=True):
        assert (a.lora_a.grad - b.lora_a.grad).abs().max().item() < 1e-5
        assert (a.lora_b.grad - b.lora_b.grad).abs().max().item() < 1e-5
    assert not big & set(saved_shapes), "a dequantised weight was kept for the backward pass"


def test_bad_specs_are_one_line_errors() -> None:
    model = Llama(LlamaConfig.from_name("tiny-gqa"))  # dim 64, kv width 32
    with pytest.raises(CamelidError, match=r"rank 48 is larger than layers\.0\.attention\.wk \(64 -> 32\); use a "
                                           r"rank of at most 32"):
        apply_lora(copy.deepcopy(model), rank=48)
    with pytest.raises(CamelidError, match="not linears of a block"):
        apply_lora(copy.deepcopy(model), targets=["q_proj"])
    with pytest.raises(CamelidError, match="positive integer"):
        apply_lora(copy.deepcopy(model), rank=0)
    with pytest.raises(CamelidError, match="unfused model"):
        apply_lora(fuse(copy.deepcopy(model)))
    twice = apply_lora(copy.deepcopy(model))
    with pytest.raises(CamelidError, match="already has LoRA"):
        apply_lora(twice)
    assert lora_spec(twice) == LoraSpec()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_head_gives_the_dequantised_models_loss_and_gradients(name: str) -> None:
    """QLoRA's int8 embedding and head (quantize_head): the training loss and the adapters' gradients are those
    of the same model holding the dequantised tables in fp32."""
    from camelid.variants.training import next_token_loss

    torch.manual_seed(0)
    model = quantize_base(TrainLlama(CONFIGS[name]), "int4")
    quantize_head(model)
    reference = copy.deepcopy(model)
    # the reference: the same int8 tables, dequantised into an fp32 embedding and head
    emb = nn.Embedding(*reference.tok_embeddings.table.qweight.shape)
    emb.weight = nn.Parameter(reference.tok_embeddings.dequantize(), requires_grad=False)
    head = nn.Linear(emb.weight.shape[1], reference.output.out_features, bias=False)
    head.weight = nn.Parameter(reference.output.dequantize(), requires_grad=False)
    reference.tok_embeddings, reference.output = emb, head
    for m in (model, reference):
        torch.manual_seed(1)
        apply_lora(m, rank=4, alpha=8)
        randomize_adapters(m)
    ids = torch.randint(0, CONFIGS[name].vocab_size, (2, 12))
    targets = torch.randint(0, CONFIGS[name].vocab_size, (2, 12))
    positions = torch.tensor([1, 4, 5, 13, 20])
    losses = [next_token_loss(m, ids, targets, positions) for m in (model, reference)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    grads = [{k: p.grad for k, p in m.named_parameters() if p.requires_grad} for m in (model, reference)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6)
