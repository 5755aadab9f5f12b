"""camelid.train.checkpoint: what is written (SHA256SUMS last), what reading checks, what pruning keeps, and a write
that fails (a full disk) leaving the checkpoints before it as they were."""

from __future__ import annotations

import errno

import pytest
import torch

from camelid import checksums
from camelid.errors import CamelidError
from camelid.train import checkpoint as ckpt


def save(out, step: int, keep: int = 2):
    weights = {"w": torch.full((4, 4), float(step)), "b": torch.arange(3.0)}
    state = {"step": step, "optimizer": {"state": {}, "param_groups": []}}
    return ckpt.save(out, step, weights, state, {"tokens": step * 10}, keep=keep)


def test_a_checkpoint_ends_with_its_checksums_and_reads_back(tmp_path) -> None:
    path = save(tmp_path, 5)
    assert sorted(p.name for p in path.iterdir()) == ["SHA256SUMS", "meta.json", "model.safetensors", "state.pt"]
    assert set(checksums.read_manifest(path)) == set(ckpt.FILES)
    weights, state, meta = ckpt.load(path)
    assert weights["w"].eq(5).all() and state["step"] == 5 and meta["tokens"] == 50
    assert ckpt.latest(tmp_path) == path


@pytest.mark.parametrize("name", ckpt.FILES)
def test_a_damaged_file_is_named_with_the_newest_whole_checkpoint(tmp_path, name) -> None:
    save(tmp_path, 5)
    save(tmp_path, 10, keep=3)
    path = save(tmp_path, 15, keep=3)
    for older in ("step-000010", "step-000015"):  # the newest whole one is named, not just any
        data = bytearray((path.parent / older / name).read_bytes())
        data[len(data) // 2] ^= 1
        (path.parent / older / name).write_bytes(bytes(data))
    with pytest.raises(CamelidError, match=rf"step-000015/{name}: damaged .* step-000005 is whole: write step-000005"):
        ckpt.load(path)


def test_pruning_keeps_the_newest_and_the_protected(tmp_path) -> None:
    for step in (5, 10, 15):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000010", "step-000015"]
    ckpt.prune(tmp_path / "checkpoints", keep=1, protect=tmp_path / "checkpoints" / "step-000010")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000010", "step-000015"]
    ckpt.prune(tmp_path / "checkpoints", keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000015"]


def test_a_checkpoint_written_without_checksums_still_loads(tmp_path) -> None:
    path = save(tmp_path, 5)
    (path / "SHA256SUMS").unlink()
    assert ckpt.load(path)[1]["step"] == 5


def test_a_full_disk_leaves_the_earlier_checkpoints(tmp_path, monkeypatch) -> None:
    save(tmp_path, 5)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CamelidError, match=r"step-000010: the checkpoint could not be written \(no space left on "
                                           r"device\); the checkpoints written before it are intact"):
        save(tmp_path, 10)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000005"]  # no half-written folder
    assert ckpt.latest(tmp_path).name == "step-000005"
