"""Checkpoints that survive kill -9, a full disk and flipped bits: each is a folder written under a temporary
name, ended by a manifest of its files' sha256 (camelid.checksums), flushed to disk, then renamed, and only
then does the `latest` pointer move to it. Reading one back checks every file against the manifest first, and
pruning never deletes the newest checkpoint that verified.

    out/checkpoints/step-000100/model.safetensors   weights (camelid names; a tied head is stored once)
    out/checkpoints/step-000100/state.pt            optimizer, scheduler, RNG states, step (tensors and
                                                    plain containers only: read back with weights_only=True)
    out/checkpoints/step-000100/meta.json           step, tokens seen, the training config
    out/checkpoints/step-000100/SHA256SUMS          written last: `sha256sum -c SHA256SUMS` checks it too
    out/checkpoints/latest                          the name of the newest complete checkpoint
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from camelid import checksums
from camelid.errors import CamelidError
from camelid.fileio import atomic_write

FILES = ("model.safetensors", "state.pt", "meta.json")


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
    """Write checkpoint `step` completely, then point `latest` at it, then prune the oldest beyond `keep`.
    A failed write (a full disk) removes what it wrote and raises a one-line CamelidError; the checkpoints
    written before are untouched."""
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp"
    # safetensors refuses shared tensors: store a tied head once (the loader re-ties it)
    weights, seen = {}, set()
    for k, t in model_state.items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        weights[k] = t.detach().cpu().contiguous()
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
        torch.save(train_state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
        checksums.write_manifest(tmp)  # every file in the folder, last
        _flush(tmp)  # on disk before the rename makes it a checkpoint (a power cut keeps it whole)
        final = root / name
        if final.exists():  # left by a run that died after the rename but before `latest` moved: not the good one
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write(root / "latest", lambda p: p.write_text(name + "\n"))
    except (OSError, SafetensorError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        why = _write_failure(e, root)
        fix = "free some space" if why == "no space left on device" else "fix that"
        raise CamelidError(f"{root / name}: the checkpoint could not be written ({why}); the checkpoints written "
                           f"before it are intact; {fix}, then continue with --resume") from None
    prune(root, keep, protect=final)
    return final


def prune(root: Path, keep: int, protect: Path | None = None) -> None:
    """Delete the checkpoints older than the `keep` newest (keep <= 0: none), never `protect` (the newest one
    known to verify: the one just written)."""
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if protect is None or old.name != protect.name:
            shutil.rmtree(old, ignore_errors=True)


def _flush(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if os.name == "posix":  # the folder's entries too (Windows cannot open a folder this way)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_failure(e: BaseException, root: Path) -> str:
    """What went wrong in a few words: a full disk said plainly, whichever library reported it."""
    text = " ".join(str(e).split())
    try:
        full = shutil.disk_usage(root).free < 1 << 20
    except OSError:
        full = False
    if getattr(e, "errno", None) == 28 or "No space left" in text or full:
        return "no space left on device"
    return text[:160] or type(e).__name__


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


def verify(path: Path) -> None:
    """Check every file of checkpoint `path` against its SHA256SUMS (a checkpoint written without one is read
    as it is): a one-line CamelidError names the first damaged file and the newest older checkpoint that is whole."""
    if checksums.has_manifest(path):
        found = checksums.problem(path)
        if found is not None:
            raise CamelidError(f"{found}; {_fix(path)}")


def _fix(path: Path) -> str:
    """What to do about damaged checkpoint `path`: resume from the newest older checkpoint that verifies."""
    root = path.parent
    older = sorted((p for p in root.glob("step-*") if p.is_dir() and p.name < path.name), reverse=True)
    for candidate in older:
        with contextlib.suppress(CamelidError, OSError):  # an unreadable manifest: not whole, look further
            if checksums.has_manifest(candidate) and checksums.problem(candidate) is None:
                return (f"{candidate.name} is whole: write {candidate.name} into {root / 'latest'} to resume from it, "
                        "or start fresh without --resume")
    return "no older checkpoint is whole; start fresh without --resume"


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state, train state, meta) of one checkpoint folder, its files checked against SHA256SUMS first;
    any damage is a one-line CamelidError naming the file."""
    path = Path(path)
    verify(path)
    try:
        with safe_open(path / "model.safetensors", framework="pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError) as e:
        raise CamelidError(f"{path}/model.safetensors: corrupt or missing ({' '.join(str(e).split())[:120]}); "
                           f"{_fix(path)}") from None
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise CamelidError(f"{path}/state.pt: corrupt or missing ({type(e).__name__}); {_fix(path)}") from None
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CamelidError(f"{path}/meta.json: corrupt or missing; {_fix(path)}") from None
    if not isinstance(state, dict) or "optimizer" not in state or not isinstance(meta, dict) or \
            state.get("step") != meta.get("step"):
        raise CamelidError(f"{path}: state.pt and meta.json do not belong together; {_fix(path)}")
    return weights, state, meta


def clean_partial(out: str | Path) -> None:
    """Remove folders of checkpoints whose writing was cut short."""
    for tmp in checkpoint_dir(out).glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
