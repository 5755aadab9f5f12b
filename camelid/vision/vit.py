"""A small Vision Transformer (Dosovitskiy et al. 2020): the image encoder of camelid's vision models.

Pixels [B, 3, H, W] -> non-overlapping patches, each a linear projection (a strided convolution) plus a learned
position embedding -> N x [LayerNorm -> self-attention -> residual -> LayerNorm -> GELU MLP -> residual] ->
LayerNorm -> one feature vector per patch [B, patches, dim]. No class token: the text model reads every patch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.errors import CamelidError


@dataclass
class ViTConfig:
    image_size: int = 48  # square images, in pixels
    patch_size: int = 16
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise CamelidError(f"vit: image_size {self.image_size} is not a multiple of patch_size "
                               f"{self.patch_size}; pick sizes that tile the image")
        if self.dim % 4:
            raise CamelidError(f"vit: dim {self.dim} must be a multiple of 4 (the 2-D sin/cos positions)")
        if self.dim % self.n_heads:
            raise CamelidError(f"vit: dim {self.dim} is not divisible by n_heads {self.n_heads}")

    @property
    def grid(self) -> int:
        """Patches along each side."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


def sincos_2d(grid: int, dim: int) -> Tensor:
    """[grid*grid, dim]: half the channels sin/cos of the row, half of the column, at frequencies from pi/2 to
    grid*pi/2 per patch (so that even a 3x3 grid's positions differ: no two share more than ~60% of their norm)."""
    n = dim // 4
    freqs = (math.pi / 2) * float(grid) ** (torch.arange(n, dtype=torch.float64) / max(1, n - 1))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = [f(pos.flatten()[:, None].double() * freqs) for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


class PatchEmbedding(nn.Module):
    """Each patch_size x patch_size patch -> one dim-vector, plus its position's learned embedding."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, config.dim, kernel_size=config.patch_size, stride=config.patch_size)
        # learned, but started from 2-D sin/cos (as MAE fixes them) rather than ViT's N(0, 0.02): at the scale of
        # the patch features, so attention can tell the patches apart from the first step of a short training
        self.position = nn.Parameter(sincos_2d(config.grid, config.dim)[None])

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.proj(pixels)  # [B, dim, grid, grid]
        return x.flatten(2).transpose(1, 2) + self.position  # [B, patches, dim], row by row


class SelfAttention(nn.Module):
    """Every patch attends to every patch (no mask)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.mlp_ratio * config.dim)
        self.fc2 = nn.Linear(config.mlp_ratio * config.dim, config.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm: x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attention = SelfAttention(config)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.attention(self.norm1(x))
        return h + self.mlp(self.norm2(h))


class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patches = PatchEmbedding(config)
        self.layers = nn.ModuleList(ViTBlock(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, image_size, image_size], scaled to [-1, 1] -> features [B, patches, dim]."""
        size = self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise CamelidError(f"the image encoder takes pixels of shape [batch, 3, {size}, {size}], got "
                               f"{list(pixels.shape)}; load images with camelid.vision.image.load_image")
        x = self.patches(pixels)
        for block in self.layers:
            x = block(x)
        return self.norm(x)
