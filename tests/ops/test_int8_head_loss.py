"""The int8 head's loss (QLoRA: the tied embedding kept as int8 rows) against the dequantised fp32 head's."""

from __future__ import annotations

import pytest
import torch

from camelid.ops import head_loss
from camelid.ops.linear import quantize_int8


@pytest.mark.parametrize("n", [1, 37])
def test_int8_head_loss_matches_the_dequantised_head(n: int) -> None:
    g = torch.Generator().manual_seed(0)
    vocab, dim = head_loss.INT8_HEAD_BLOCK * 2 + 123, 40  # three blocks, the last one partial
    qweight, scale = quantize_int8(torch.randn(vocab, dim, generator=g))
    weight = qweight.float() * scale[:, None]
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[0] = vocab - 1  # a target in the partial block
    h = torch.randn(n, dim, generator=g, requires_grad=True)
    h_ref = h.detach().clone().requires_grad_(True)

    loss = head_loss.int8_head_loss(h, qweight, scale, targets)
    (loss * 3.0).backward()
    ref = head_loss.reference(h_ref, weight, targets)
    (ref * 3.0).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)


def test_int8_head_loss_without_grad() -> None:
    qweight, scale = quantize_int8(torch.randn(100, 8))
    h, targets = torch.randn(5, 8), torch.tensor([0, 99, 3, 50, 7])
    with torch.no_grad():
        loss = head_loss.int8_head_loss(h, qweight, scale, targets)
    torch.testing.assert_close(loss, head_loss.reference(h, qweight.float() * scale[:, None], targets))
