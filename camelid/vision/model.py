"""VisionLlama: a frozen camelid Llama joined to a ViT image encoder, built from the outside.

Two ways of joining them (`VisionConfig.fusion`):

    cross-attention  Llama 3.2 Vision: a gated cross-attention layer after every k-th text block
                     (`model.layers[i]` is replaced by the block followed by the layer); the image never enters
                     the text sequence, its keys and values are computed once per image.
    projector        LLaVA / nanoVLM: the image becomes a few tokens (pixel shuffle + MLP) that take the place of
                     the first token embeddings of the prompt (`model.tok_embeddings` is wrapped).

Either way the text model's own classes and forward pass run unchanged, and its weights stay frozen: only the
image encoder and the cross-attention layers (or the projector) are trained, and only they are in
`state_dict()`; a checkpoint names the text model it was trained on (camelid/vision/checkpoint.py).
With no image set, a request runs exactly as on the text model alone.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from camelid.errors import CamelidError
from camelid.model import Llama
from camelid.vision.cross_attention import BlockThenCrossAttention, GatedCrossAttention
from camelid.vision.projector import ImagePrefixEmbedding, ImageProjector
from camelid.vision.vit import ViT, ViTConfig

FUSIONS = ("cross-attention", "projector")
IGNORE = -100  # a target that is not scored (the prompt, padding)


@dataclass
class VisionConfig:
    base: str = "smollm2-135m-instruct"  # the frozen text model: anything camelid.load takes
    fusion: str = "cross-attention"  # or "projector"
    vit: ViTConfig = field(default_factory=ViTConfig)
    every: int = 5  # cross-attention: a layer after every `every`-th text block (blocks every-1, 2*every-1, ...)
    layers: list[int] | None = None  # ... or after exactly these blocks (0-based)
    cross_hidden: int = 0  # SwiGLU width of each cross-attention layer (0: the text model's intermediate_size)
    gate_scale: float = 1.0  # each gate is tanh(gate_scale * parameter): > 1 opens the gates in fewer steps
    projector_hidden: int = 0  # projector: width of its MLP (0: the text model's dim)
    pixel_shuffle: int = 1  # projector: s x s neighbouring patches per image token

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> VisionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise CamelidError(f"vision model: unknown field(s) {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(known))}")
        spec = dict(spec)
        vit = spec.pop("vit", None) or {}
        if isinstance(vit, dict):
            vit_known = {f.name for f in dataclasses.fields(ViTConfig)}
            if set(vit) - vit_known:
                raise CamelidError(f"vision model: unknown vit field(s) {', '.join(sorted(set(vit) - vit_known))}; "
                                   f"known: {', '.join(sorted(vit_known))}")
            vit = ViTConfig(**vit)
        config = cls(vit=vit, **spec)
        config.validate()
        return config

    def validate(self) -> None:
        if self.fusion not in FUSIONS:
            raise CamelidError(f"vision model: fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.every < 1:
            raise CamelidError(f"vision model: every must be at least 1, got {self.every}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def image_tokens(self) -> int:
        """Context tokens an image takes in the text sequence: 0 for cross-attention."""
        return 0 if self.fusion == "cross-attention" else (self.vit.grid // self.pixel_shuffle) ** 2

    def cross_layers(self, n_layers: int) -> list[int]:
        """The text blocks that a cross-attention layer follows."""
        layers = list(range(self.every - 1, n_layers, self.every)) if self.layers is None else list(self.layers)
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad or not layers or len(set(layers)) != len(layers):
            raise CamelidError(f"vision model: cross-attention layers {layers} must be distinct block indices in "
                               f"0..{n_layers - 1} (the text model has {n_layers} blocks)")
        return sorted(layers)


class VisionLlama(nn.Module):
    """Duck-types a Llama for camelid.generate: forward(input_ids, positions, last_only=...), setup_cache,
    clear_cache, config. An image is set with `set_image` / `with model.image(pixels):` (generation) or passed
    to forward as `images=` (training)."""

    def __init__(self, text: Llama, config: VisionConfig, dtype: torch.dtype | None = None) -> None:
        """`dtype` of the trained parts: the text model's by default; float32 to train them against a bf16 text
        model under autocast."""
        super().__init__()
        if any(isinstance(b, BlockThenCrossAttention) for b in text.layers) or \
                isinstance(text.tok_embeddings, ImagePrefixEmbedding):
            raise CamelidError("this text model is already joined to an image encoder; load a fresh copy of it")
        config.validate()
        self.vision_config = config
        text.requires_grad_(False).eval()
        tc = text.config
        self.vision = ViT(config.vit)
        self.cross = nn.ModuleList()
        self.projector: ImageProjector | None = None
        self.layer_ids: list[int] = []
        if config.fusion == "cross-attention":
            self.layer_ids = config.cross_layers(tc.n_layers)
            hidden = config.cross_hidden or tc.intermediate_size
            self.cross.extend(GatedCrossAttention(tc, config.vit.dim, hidden, config.gate_scale)
                              for _ in self.layer_ids)
            for i, cross in zip(self.layer_ids, self.cross, strict=True):
                text.layers[i] = BlockThenCrossAttention(text.layers[i], cross)
        else:
            self.projector = ImageProjector(config.vit.grid, config.vit.dim, tc.dim,
                                            config.projector_hidden or tc.dim, config.pixel_shuffle)
            text.tok_embeddings = ImagePrefixEmbedding(text.tok_embeddings)
        self._text_only: Llama | None = None
        self.text = text  # registered after the trained parts, so that parameters() names them cross.*, not text.*
        p = text.norm.weight
        for module in (self.vision, self.cross, self.projector):
            if module is not None:
                module.to(device=p.device, dtype=dtype or p.dtype)

    # -- what camelid.generate needs of a model ------------------------------------------------------
    @property
    def config(self):  # noqa: ANN201 - the text model's LlamaConfig
        return self.text.config

    @property
    def norm(self) -> nn.Module:
        return self.text.norm

    @property
    def cache_len(self) -> int:
        return self.text.cache_len

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        self.text.setup_cache(batch_size, max_seq_len, dtype)

    def clear_cache(self) -> None:
        """Frees the text model's KV cache; the image (and its keys and values) stays set."""
        self.text.clear_cache()

    def text_only(self) -> Llama:
        """The text model as it was before joining: a Llama sharing every tensor (and the KV caches) with this
        one, with its own blocks and embeddings in place of the wrappers. A request without an image runs on it
        exactly as on the text model alone, through the same fast paths (the C++ decode step of a fused or
        quantised model); the cross-attention layers would be skipped anyway."""
        if self._text_only is None:
            view = copy.copy(self.text)  # a shallow copy: same parameters and buffers, its own module table
            view._modules = dict(self.text._modules)
            view.layers = nn.ModuleList(b.block if isinstance(b, BlockThenCrossAttention) else b
                                        for b in self.text.layers)
            if isinstance(view.tok_embeddings, ImagePrefixEmbedding):
                view.tok_embeddings = view.tok_embeddings.embedding
            object.__setattr__(self, "_text_only", view)  # not a submodule: parameters() must not list it twice
        return self._text_only

    # -- images ---------------------------------------------------------------------------------------
    @property
    def image_tokens(self) -> int:
        """Context tokens an image takes in the text sequence: 0 for cross-attention."""
        return 0 if self.projector is None else self.projector.n_tokens

    def with_image_tokens(self, ids: list[int], placeholder: int = 0) -> list[int]:
        """The prompt ids for a request with an image: the projector's placeholders first (none for
        cross-attention). The placeholders' own embeddings are never read."""
        return [placeholder] * self.image_tokens + list(ids)

    def set_image(self, pixels: Tensor | None) -> None:
        """Encode pixels [B, 3, size, size] (camelid.vision.image.load_image) once for the requests that follow;
        None goes back to text only."""
        if pixels is None:
            features = None
        else:
            p = self.vision.norm.weight
            features = self.vision(pixels.to(device=p.device, dtype=p.dtype))
        for cross in self.cross:
            cross.set_image(features)
        if self.projector is not None:
            self.text.tok_embeddings.image_tokens = None if features is None else self.projector(features)

    @contextmanager
    def image(self, pixels: Tensor) -> Iterator[None]:
        self.set_image(pixels)
        try:
            yield
        finally:
            self.set_image(None)

    @property
    def has_image(self) -> bool:
        if self.projector is not None:
            return self.text.tok_embeddings.image_tokens is not None
        return self.cross[0].image_kv is not None

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, positions: Tensor | None = None, *, images: Tensor | None = None,
                targets: Tensor | None = None, last_only: bool = False, key_mask: Tensor | None = None) -> Tensor:
        """Logits [B, T, vocab] (see Llama.forward); `images` [B, 3, size, size] are used for this call only,
        otherwise the image set by set_image (if any) is.

        With `targets` [B, T] (the next token at each position, IGNORE where there is nothing to learn): the mean
        cross-entropy instead, the output head applied only at the positions that have a target."""
        if targets is not None:
            h = self.hidden_states(input_ids, positions, images=images, key_mask=key_mask)
            scored = targets != IGNORE
            return F.cross_entropy(self.text.output(h[scored]).float(), targets[scored])
        if images is not None:
            with self.image(images):
                return self(input_ids, positions, last_only=last_only, key_mask=key_mask)
        self._locate(positions)
        return self.text(input_ids, positions, last_only=last_only, key_mask=key_mask)

    def hidden_states(self, input_ids: Tensor, positions: Tensor | None = None, *, images: Tensor | None = None,
                      key_mask: Tensor | None = None) -> Tensor:
        """The final-norm hidden states [B, T, dim] that the text model's head reads."""
        if images is not None:
            with self.image(images):
                return self.hidden_states(input_ids, positions, key_mask=key_mask)
        self._locate(positions)
        return self.text.hidden_states(input_ids, positions, key_mask=key_mask)

    # -- the frozen blocks below the first cross-attention layer ----------------------------------------
    @property
    def image_free_blocks(self) -> int:
        """How many of the text model's first blocks never see the image: all blocks before the first
        cross-attention layer (that one's block is wrapped with it, so it runs later); 0 for the projector, whose image
        tokens enter at the embeddings. Their output depends on the text alone, so training may compute it once
        per distinct prompt (`prefix_states`) and start every later pass from there (`hidden_states_from`)."""
        return self.layer_ids[0] if self.projector is None else 0

    @torch.no_grad()
    def prefix_states(self, input_ids: Tensor) -> Tensor:
        """The residual stream [B, T, dim] after the image-free blocks (a causal pass, no image, no gradient)."""
        x = self.text.tok_embeddings(input_ids)
        cos, sin = self.text.rope(torch.arange(input_ids.shape[1], device=input_ids.device), x.dtype)
        for block in self.text.layers[:self.image_free_blocks]:
            x = block(x, cos, sin, None, None)
        return x

    def hidden_states_from(self, x: Tensor, images: Tensor | None = None) -> Tensor:
        """The rest of a causal pass: the residual stream x [B, T, dim] after the image-free blocks -> the
        final-norm hidden states, as hidden_states(input_ids, images=images) gives them."""
        if images is not None:
            with self.image(images):
                return self.hidden_states_from(x)
        cos, sin = self.text.rope(torch.arange(x.shape[1], device=x.device), x.dtype)
        for block in self.text.layers[self.image_free_blocks:]:
            x = block(x, cos, sin, None, None)
        return self.text.norm(x)

    def _locate(self, positions: Tensor | None) -> None:
        """The projector's image tokens go in only where a call starts at position 0 (not in decode steps)."""
        if self.projector is not None:
            self.text.tok_embeddings.at_start = positions is None or int(positions.reshape(-1)[0]) == 0

    # -- what is trained and saved --------------------------------------------------------------------
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        """The trained tensors only (vision.*, cross.* or projector.*): the frozen text model is not saved."""
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.startswith(prefix + "text.")]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True,  # type: ignore[override]
                        assign: bool = False) -> _IncompatibleKeys:
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith("text.")]
        if strict and (missing or result.unexpected_keys):
            raise CamelidError(f"the weights do not fit this vision model (missing {missing[:3]}, unexpected "
                               f"{result.unexpected_keys[:3]}); load them with the config that wrote them")
        return _IncompatibleKeys(missing, result.unexpected_keys)
