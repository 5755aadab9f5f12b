"""Nothing lost: a checkpoint with flipped bytes is refused by --resume and by camelid.load, naming the file and the
newest checkpoint that is whole, and none is pruned or overwritten; a disk that fills up while a checkpoint is written
costs that checkpoint alone, in one line, and the run resumes once there is space. (`camelid pretrain` runs in a
subprocess, as a user runs it.)"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reliability_helpers import ROOT, TINY_RUN, assert_one_line_error, camelid, settings

from camelid import checksums
from camelid.errors import CamelidError


def flip_tensor_bytes(path: Path, at: int = 100) -> None:
    """Flip a byte of a safetensors file's tensor data (past its header): the file still parses."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + at] ^= 0xFF
    path.write_bytes(bytes(data))


def steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def test_a_damaged_checkpoint_is_refused_and_the_last_good_one_kept(tiny_data, tmp_path) -> None:
    out = tmp_path / "out"
    run = settings(*TINY_RUN, f"data={tiny_data}", f"out={out}", "checkpoint_interval=5", "keep_checkpoints=2")
    r = camelid("pretrain", *run, "--set", "max_steps=10", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ckpts = out / "checkpoints"
    assert steps(out) == ["step-000005", "step-000010"]
    for name in steps(out):  # every file is listed, and coreutils agrees with the manifest
        assert set(checksums.read_manifest(ckpts / name)) == {"model.safetensors", "state.pt", "meta.json"}
        if shutil.which("sha256sum"):
            subprocess.run(["sha256sum", "--check", "--quiet", checksums.MANIFEST], cwd=ckpts / name, check=True)

    flip_tensor_bytes(ckpts / "step-000010" / "model.safetensors")
    r = camelid("pretrain", *run, "--set", "max_steps=20", "--resume", "--no-progress", cwd=tmp_path)
    assert_one_line_error(r, "step-000010/model.safetensors: damaged", "step-000005 is whole")
    # nothing was trained, pruned or overwritten
    assert steps(out) == ["step-000005", "step-000010"]
    assert (ckpts / "latest").read_text().strip() == "step-000010"
    assert checksums.problem(ckpts / "step-000005") is None

    import camelid as camelid_api  # camelid.load of a checkpoint checks it too

    with pytest.raises(CamelidError, match="step-000010/model.safetensors: damaged"):
        camelid_api.load(out)

    # the advice works: resume from the whole checkpoint; the damaged one is replaced, the newest kept
    (ckpts / "latest").write_text("step-000005\n")
    r = camelid("pretrain", *run, "--set", "max_steps=20", "--resume", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert steps(out) == ["step-000015", "step-000020"]
    assert all(checksums.problem(ckpts / name) is None for name in steps(out))


def test_a_damaged_export_is_refused_by_camelid_load(tiny_data, tmp_path) -> None:
    out = tmp_path / "out"
    run = settings(*TINY_RUN, f"data={tiny_data}", f"out={out}", "checkpoint_interval=0", "export=true",
                   "max_steps=2")
    r = camelid("pretrain", *run, "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listed = checksums.read_manifest(out / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(listed)

    import camelid as camelid_api

    assert camelid_api.load(out / "hf").tokenizer is not None  # whole: it loads
    flip_tensor_bytes(out / "hf" / "model.safetensors")
    r = camelid("generate", "Emma", "-m", out / "hf", "-n", "2", "--quantize", "none", cwd=tmp_path)
    assert_one_line_error(r, "hf/model.safetensors: damaged", "SHA256SUMS")


def _can_mount_tmpfs(where: Path) -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    mount = f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(where))}"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True)
    return probe.returncode == 0


def test_a_full_disk_costs_one_checkpoint_and_one_line(tiny_data, tmp_path) -> None:
    """The run's folder on a small tmpfs (mounted in a user namespace): the second checkpoint does not fit."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    # how big one checkpoint of this model is, measured: the disk gets room for one and a half
    from camelid.train import load_config, train

    probe, threads = tmp_path / "probe", torch.get_num_threads()
    try:
        train(load_config(None, [*TINY_RUN, f"data={tiny_data}", f"out={probe}", "max_steps=1",
                                 "checkpoint_interval=1"]), progress=False)
    finally:
        torch.set_num_threads(threads)  # the run's threads=1 is not for the tests after this one
    size = sum(f.stat().st_size for f in (probe / "checkpoints" / "step-000001").iterdir())
    room = int(size * 1.5) + (256 << 10)  # + logs, config.json, the tensorboard events

    out = mnt / "out"
    run = " ".join(shlex.quote(a) for a in settings(*TINY_RUN, f"data={tiny_data}", f"out={out}",
                                                     "checkpoint_interval=5", "keep_checkpoints=2"))
    py = f"PYTHONPATH={shlex.quote(str(ROOT))} {shlex.quote(sys.executable)} -m camelid pretrain {run} --no-progress"
    script = f"""
        set -u
        mount -t tmpfs -o size={room} tmpfs {mnt}
        {py} --set max_steps=15 > /dev/null 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1
        ls -a {out}/checkpoints > {tmp_path}/after-full
        cat {out}/checkpoints/latest > {tmp_path}/latest-after-full
        mount -o remount,size={room * 4} {mnt}
        {py} --set max_steps=15 --resume > /dev/null 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2
        ls -a {out}/checkpoints > {tmp_path}/after-resume
    """
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, timeout=900)

    full = subprocess.CompletedProcess([], int((tmp_path / "rc1").read_text()), "", (tmp_path / "err1").read_text())
    assert_one_line_error(full, "step-000010: the checkpoint could not be written (no space left on device)",
                          "checkpoints written before it are intact")
    # the good checkpoint survived, `latest` still names it, and no half-written folder is left
    assert (tmp_path / "after-full").read_text().split() == [".", "..", "latest", "step-000005"]
    assert (tmp_path / "latest-after-full").read_text().strip() == "step-000005"
    # with space again, --resume carries on from it
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert (tmp_path / "after-resume").read_text().split() == [".", "..", "latest", "step-000010", "step-000015"]
