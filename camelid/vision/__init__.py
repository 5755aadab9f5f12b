"""Seeing: a ViT image encoder joined to a frozen camelid Llama, by gated cross-attention (Llama 3.2 Vision) or
by image tokens in the text sequence (LLaVA, nanoVLM). See docs/multimodal.md."""

from camelid.vision.checkpoint import load_vision, save_vision
from camelid.vision.model import VisionConfig, VisionLlama
from camelid.vision.vit import ViT, ViTConfig

__all__ = ["ViT", "ViTConfig", "VisionConfig", "VisionLlama", "load_vision", "save_vision"]
