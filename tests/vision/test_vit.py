"""The image encoder and the projector's pixel shuffle."""

from __future__ import annotations

import pytest
import torch

from camelid import CamelidError
from camelid.vision.projector import pixel_shuffle
from camelid.vision.vit import ViT, ViTConfig, sincos_2d


def test_vit_gives_one_feature_vector_per_patch_in_reading_order() -> None:
    config = ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=2, n_heads=4)
    vit = ViT(config).eval()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    features = vit(pixels)
    assert features.shape == (2, 16, 32)
    # patch (row 1, col 2) sees only its own pixels in the patch embedding
    changed = pixels.clone()
    changed[:, :, 8:16, 16:24] = 0
    embedded = vit.patches(pixels) - vit.patches(changed)
    assert embedded[:, 1 * 4 + 2].abs().max() > 0
    assert embedded[:, [i for i in range(16) if i != 6]].abs().max() == 0
    with pytest.raises(CamelidError, match=r"shape \[batch, 3, 32, 32\]"):
        vit(torch.zeros(1, 3, 16, 16))
    with pytest.raises(CamelidError, match="multiple of patch_size"):
        ViTConfig(image_size=30, patch_size=8)


def test_positions_start_distinct() -> None:
    p = sincos_2d(3, 128)
    cos = torch.nn.functional.cosine_similarity(p[:, None], p[None], dim=-1)
    assert (cos - torch.eye(9)).max() < 0.7  # every position far from every other at the start


def test_pixel_shuffle_groups_neighbouring_patches() -> None:
    grid, C = 4, 3
    features = torch.arange(grid * grid * C, dtype=torch.float).view(1, grid * grid, C)
    out = pixel_shuffle(features, grid, 2)
    assert out.shape == (1, 4, 4 * C)
    # token 1 (top right 2x2 square) holds patches 2, 3, 6, 7 in that order
    assert torch.equal(out[0, 1], torch.cat([features[0, i] for i in (2, 3, 6, 7)]))
