"""Checkpoints that survive kill -9: each is a folder written under a temporary name, then renamed, and
only then does the `latest` pointer move to it. The previous good checkpoint is kept until then.

    out/checkpoints/step-000100/model.safetensors   weights (camelid names; a tied head is stored once)
    out/checkpoints/step-000100/state.pt            optimizer, scheduler, RNG states, step (tensors and
                                                    plain containers only: read back with weights_only=True)
    out/checkpoints/step-000100/meta.json           step, tokens seen, the training config
    out/checkpoints/latest                          the name of the newest complete checkpoint
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from camelid.errors import CamelidError
from camelid.fileio import atomic_write


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out: str | Path, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
         meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `step` completely, then point `latest` at it, then prune the oldest beyond `keep`."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors refuses shared tensors: store a tied head once (the loader re-ties it)
    weights, seen = {}, set()
    for k, t in model_state.items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        weights[k] = t.detach().cpu().contiguous()
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
    torch.save(train_state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
    final = root / name
    if final.exists():  # left by a run that died after the rename but before `latest` moved: not the good one
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write(root / "latest", lambda p: p.write_text(name + "\n"))
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out: str | Path) -> Path:
    root = checkpoint_dir(out)
    pointer = root / "latest"
    if not pointer.is_file():
        raise CamelidError(f"{root}: no checkpoint to resume from; run without --resume to start fresh")
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CamelidError(f"{pointer} names {path.name}, which is missing; resume from another checkpoint by "
                           "writing its folder name into that file, or start fresh without --resume")
    return path


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, train state, meta) of one checkpoint folder; any damage is a one-line CamelidError."""
    fix = "delete that folder and write an older checkpoint's name into checkpoints/latest, or start fresh"
    try:
        with safe_open(path / "model.safetensors", framework="pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError) as e:
        raise CamelidError(f"{path}/model.safetensors: corrupt or missing ({' '.join(str(e).split())[:120]}); "
                           f"{fix}") from None
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise CamelidError(f"{path}/state.pt: corrupt or missing ({type(e).__name__}); {fix}") from None
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise CamelidError(f"{path}/meta.json: corrupt or missing; {fix}") from None
    if not isinstance(state, dict) or "optimizer" not in state or state.get("step") != meta.get("step"):
        raise CamelidError(f"{path}: state.pt and meta.json do not belong together; {fix}")
    return weights, state, meta


def clean_partial(out: str | Path) -> None:
    """Remove folders of checkpoints whose writing was cut short."""
    for tmp in checkpoint_dir(out).glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
