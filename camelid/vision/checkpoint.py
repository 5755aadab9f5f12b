"""A vision model on disk: what was trained, and the name of the frozen text model it was trained on.

    vision.safetensors   the image encoder and the cross-attention layers (or the projector), nothing else
    vision.json          VisionConfig (base model, fusion, the text blocks followed by cross-attention, ViT
                         sizes), the text model's shape, the prompt format and the weights' sha256

Both are written atomically (the config last, so a folder with a config is complete) and checked on read: the
weights against their sha256, the text model against the recorded shape, the tensors against the config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from camelid.errors import CamelidError
from camelid.fileio import atomic_write, atomic_write_text
from camelid.model import Llama
from camelid.vision.model import VisionConfig, VisionLlama

CONFIG_FILE = "vision.json"
WEIGHTS_FILE = "vision.safetensors"
FORMAT = "camelid-vision-1"
PROMPT = "the question as typed; the answer follows after a space and ends with the tokenizer's eos token"
TEXT_SHAPE = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "intermediate_size")


def is_vision_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_vision(model: VisionLlama, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))
    config = model.vision_config.to_dict()
    if model.layer_ids:
        config["layers"] = model.layer_ids  # which blocks, explicitly
    spec = {"format": FORMAT, **config,
            "text_model": {k: getattr(model.config, k) for k in TEXT_SHAPE},
            "image_tokens": model.image_tokens, "prompt": PROMPT,
            "trainable_parameters": model.trainable_parameters(),
            "weights_sha256": _sha256(out / WEIGHTS_FILE)}
    atomic_write_text(out / CONFIG_FILE, json.dumps(spec, indent=2) + "\n")
    return out


def read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise CamelidError(f"{path / CONFIG_FILE}: unreadable or not JSON; the checkpoint is damaged, write it "
                           "again with `camelid vision train`") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise CamelidError(f"{path / CONFIG_FILE}: not a camelid vision checkpoint (format {FORMAT})")
    return spec


def base_model(path: str | Path) -> str:
    """The name or path of the text model a vision checkpoint was trained on (what camelid.load loads first)."""
    base = read_spec(Path(path)).get("base")
    if not isinstance(base, str) or not base:
        raise CamelidError(f"{Path(path) / CONFIG_FILE}: no 'base' text model recorded; the checkpoint is damaged")
    return base


def load_vision(path: str | Path, text: Llama) -> VisionLlama:
    """The vision model in folder `path`, joined to `text` (the text model it names, loaded by camelid.load):
    weights checked against their sha256, the text model against the recorded shape."""
    path = Path(path)
    spec = read_spec(path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise CamelidError(f"{weights_file}: missing; copy the whole checkpoint folder")
    if _sha256(weights_file) != spec.get("weights_sha256"):
        raise CamelidError(f"{weights_file}: its contents do not match the sha256 in {CONFIG_FILE}; the file is "
                           "damaged or from another run, write the checkpoint again")
    try:
        weights = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise CamelidError(f"{weights_file}: not readable ({' '.join(str(e).split())[:100]})") from None
    fields = set(VisionConfig.__dataclass_fields__)
    config = VisionConfig.from_dict({k: v for k, v in spec.items() if k in fields})
    recorded = spec.get("text_model", {})
    differs = [k for k in TEXT_SHAPE if recorded.get(k) != getattr(text.config, k)]
    if differs:
        was = ", ".join(f"{k}={recorded.get(k)}" for k in differs)
        now = ", ".join(f"{k}={getattr(text.config, k)}" for k in differs)
        raise CamelidError(f"{path}: trained on a text model with {was}, but {config.base} has {now}; give the text "
                           f"model it was trained on as 'base' in {CONFIG_FILE}")
    model = VisionLlama(text, config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise CamelidError(f"{weights_file}: the tensors do not fit {CONFIG_FILE} "
                           f"({' '.join(str(e).split())[:160]})") from None
    return model.eval()
