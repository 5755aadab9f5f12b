"""The model `camelid pretrain` trains: the reference Llama's function, computed in fewer passes over memory.

camelid/model.py is the readable reference (bit-identical to transformers). Training spends half its time
outside the matmuls on a CPU, in memory-bound elementwise ops and their autograd bookkeeping, so `for_training`
replaces, from outside, each block's modules by training modules that hold the same parameters (same names, so
checkpoints, exports, evaluation and sampling are unchanged) and run camelid.ops' training implementations:

- the output head and cross-entropy in one autograd Function, chunked over tokens, so the [tokens, vocab]
  logits are never stored (`next_token_loss`, ops.head_loss);
- causal attention, forward and backward, as a C++ kernel that multiplies only the causal triangle and reads the
  heads in the projections' [B, T, heads, d] layout, so no transposes either way (ops.attention);
- RMSNorm, SwiGLU and RoPE as Functions over one-pass C++ loops (ops.rmsnorm, ops.swiglu, ops.rope).

Under torch.compile the norms, SwiGLU and RoPE fall back to the reference ops, which inductor fuses; the fused
head stays, run eagerly, and the attention kernel is a custom op in the graph. Measured and left out (slower, or
no faster, here on CPU): one q/k/v product and one gate/up product with the weights concatenated at each forward,
a SwiGLU Function of PyTorch ops, and a feed-forward Function chunked over tokens (0.98-1.02x).

Values and gradients match the reference to float32 rounding (tests/variants/test_training.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from camelid.config import LlamaConfig
from camelid.model import Attention, FeedForward, Llama, RMSNorm
from camelid.ops import attention, head_loss, linear, rope, swiglu
from camelid.variants.fused import FastRMSNorm
from camelid.variants.quantized import Int8Linear


class TrainLinear(nn.Linear):
    """An nn.Linear holding the same parameters whose products, forward and backward, run through
    ops.linear.trainable (oneDNN's GEMM on CPUs where it beats torch's)."""

    @classmethod
    def like(cls, lin: nn.Linear) -> TrainLinear:
        twin = cls.__new__(cls)
        nn.Module.__init__(twin)  # no init of fresh weights: the parameters are lin's own
        twin.in_features, twin.out_features = lin.in_features, lin.out_features
        twin.weight = lin.weight
        twin.bias = lin.bias
        return twin

    def forward(self, x: Tensor) -> Tensor:
        return linear.trainable(x, self.weight, self.bias)


class TrainAttention(nn.Module):
    """Attention for training: the reference module's projections, ops' RoPE and causal attention in [B, T, H, d].
    `mask` may also be an ops.attention.Documents (packed rows, fine-tuning): then each document is attended on
    its own. With a KV cache (sampling during training) it runs the reference's own forward on the same tensors."""

    def __init__(self, att: Attention) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = att.n_heads, att.n_kv_heads, att.head_dim
        self.wq, self.wk, self.wv, self.wo = att.wq, att.wk, att.wv, att.wo
        self.kv_cache = att.kv_cache
        self.q_norm, self.k_norm = att.q_norm, att.k_norm  # None: for_training keeps q/k-norm models' own

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor | None, mask: Tensor | None) -> Tensor:
        if self.kv_cache is not None and positions is not None:
            return Attention.forward(self, x, cos, sin, positions, mask)  # type: ignore[arg-type]
        B, T, _ = x.shape
        H, KV, d = self.n_heads, self.n_kv_heads, self.head_dim
        # [B, T, heads, d], as the projections lay them out: the C++ attention reads them without transposes
        q, k, v = self.wq(x).view(B, T, H, d), self.wk(x).view(B, T, KV, d), self.wv(x).view(B, T, KV, d)
        q, k = rope.rope_bthd(q, cos, sin), rope.rope_bthd(k, cos, sin)
        if isinstance(mask, attention.Documents):  # packed rows: each document attends within itself
            return self.wo(attention.document_attention(q, k, v, mask).reshape(B, T, H * d))
        return self.wo(attention.causal_attention(q, k, v, mask).reshape(B, T, H * d))


class TrainFeedForward(nn.Module):
    """SwiGLU for training: the reference module's projections, ops' SwiGLU (whose backward reuses its inputs)."""

    def __init__(self, ffn: FeedForward) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = ffn.w1, ffn.w3, ffn.w2  # the reference's order: names and optimizer state line up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu.swiglu(self.w1(x), self.w3(x)))


def for_training(model: Llama) -> Llama:
    """Replace `model`'s attention, feed-forward and RMSNorm modules by their training twins, in place (the same
    parameter objects under the same names). Returns the model."""
    for block in model.layers:
        # TrainAttention has no q/k norms (Qwen3): such a block keeps the reference attention
        if isinstance(block.attention, Attention) and block.attention.q_norm is None:
            block.attention = TrainAttention(block.attention)
        if isinstance(block.feed_forward, FeedForward):
            block.feed_forward = TrainFeedForward(block.feed_forward)
    for parent in [model, *model.layers]:
        for name, child in list(parent.named_children()):
            if type(child) is RMSNorm:
                setattr(parent, name, FastRMSNorm(child))
    for parent in list(model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, TrainLinear.like(child))
    return model


def next_token_loss(model: Llama, input_ids: Tensor, targets: Tensor, loss_positions: Tensor | None = None,
                    **kwargs: Any) -> Tensor:
    """Mean cross-entropy of the model's next-token predictions for `input_ids` [B, T] against `targets` [B, T],
    through the fused head + loss (kwargs go to `model.hidden_states`, e.g. positions and mask for packing).
    `loss_positions` (indices into the flattened B x T positions) limits the loss, and the head, to those
    positions (fine-tuning: the assistant's tokens)."""
    h, y = model.hidden_states(input_ids, **kwargs).flatten(0, 1), targets.flatten()
    if loss_positions is not None:
        h, y = h.index_select(0, loss_positions), y.index_select(0, loss_positions)
    head = model.output
    if isinstance(head, Int8Linear):  # a frozen int8 head (QLoRA, camelid.variants.lora.quantize_head)
        return head_loss.int8_head_loss(h, head.qweight, head.scale, y)
    return head_loss.head_loss(h, head.weight, y)


class TrainLlama(Llama):
    """`for_training(Llama(config))` whose forward also takes `targets` and then returns `next_token_loss`, so
    that torch.compile of the model compiles the loss's blocks too."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        for_training(self)

    @classmethod
    def from_model(cls, model: Llama) -> TrainLlama:
        """The training twin of a loaded reference model, holding its very tensors (built on the meta device, so
        nothing is allocated twice). `model` itself should not be used afterwards."""
        with torch.device("meta"):
            twin = cls(model.config)
        twin.load_state_dict(model.state_dict(), assign=True)
        twin.tie_weights()
        twin.rope.inv_freq = model.rope.inv_freq
        return twin

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, *, last_only: bool = False,
                key_mask: Tensor | None = None, mask: Any = None, targets: Tensor | None = None,
                loss_positions: Tensor | None = None) -> Tensor:
        if targets is None:
            return super().forward(input_ids, positions, last_only=last_only, key_mask=key_mask, mask=mask)
        return next_token_loss(self, input_ids, targets, loss_positions, positions=positions, mask=mask)


def to_reference(model: Llama, state: dict[str, Tensor] | None = None) -> Llama:
    """The reference Llama (plain modules, what the HF/Meta/GGUF writers take) with `model`'s config and RoPE
    frequencies, holding the tensors of `state` (a state dict of `model` or of its training twin; default: `model`'s
    own), built on the meta device so nothing is copied."""
    with torch.device("meta"):
        plain = Llama(model.config)
    plain.load_state_dict(model.state_dict() if state is None else state, assign=True, strict=False)
    plain.tie_weights()
    plain.rope.inv_freq = model.rope.inv_freq.detach().cpu()
    return plain
