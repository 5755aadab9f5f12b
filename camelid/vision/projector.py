"""The other common design (LLaVA, nanoVLM): image features become tokens placed in the text sequence.

Patch features [B, grid*grid, C] -> pixel shuffle (each s x s square of neighbouring patches becomes one token of
s*s*C features, so an image costs (grid/s)^2 context tokens instead of grid^2) -> a two-layer GELU MLP into the
text model's embedding width. The text model then reads those vectors in place of its first tokens'
embeddings: the prompt starts with as many placeholder ids as the image has tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.errors import CamelidError


def pixel_shuffle(features: Tensor, grid: int, s: int) -> Tensor:
    """[B, grid*grid, C] (row by row) -> [B, (grid/s)^2, s*s*C]: each s x s square of patches into one vector."""
    B, N, C = features.shape
    g = grid // s
    x = features.view(B, g, s, g, s, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, g * g, s * s * C)


class ImageProjector(nn.Module):
    def __init__(self, grid: int, context_dim: int, text_dim: int, hidden: int, shuffle: int) -> None:
        super().__init__()
        if grid % shuffle:
            raise CamelidError(f"pixel_shuffle {shuffle} does not divide the patch grid {grid}x{grid}; pick a "
                               "divisor of image_size / patch_size")
        self.grid, self.shuffle = grid, shuffle
        self.fc1 = nn.Linear(shuffle * shuffle * context_dim, hidden)
        self.fc2 = nn.Linear(hidden, text_dim)
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    @property
    def n_tokens(self) -> int:
        return (self.grid // self.shuffle) ** 2

    def forward(self, features: Tensor) -> Tensor:
        """Image features [B, grid*grid, context_dim] -> image tokens [B, n_tokens, text_dim]."""
        return self.fc2(F.gelu(self.fc1(pixel_shuffle(features, self.grid, self.shuffle))))


class ImagePrefixEmbedding(nn.Module):
    """A text model's token embedding whose first `n_tokens` rows are replaced by image tokens while an image is
    set and `at_start` (the call covers the sequence from position 0: training, or the prompt of a generation).
    It replaces `model.tok_embeddings` from the outside and keeps the original (so a tied head stays tied)."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.image_tokens: Tensor | None = None  # [B or 1, n_tokens, dim]
        self.at_start = True

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embedding(input_ids)
        if self.image_tokens is None or not self.at_start:
            return x
        n = self.image_tokens.shape[1]
        if x.shape[1] < n:
            raise CamelidError(f"a prompt with an image starts with {n} image placeholder tokens, this one has only "
                               f"{x.shape[1]} tokens; build it with VisionLlama.with_image_tokens")
        image = self.image_tokens.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([image, x[:, n:]], dim=1)
