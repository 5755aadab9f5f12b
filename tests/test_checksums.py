"""camelid.checksums: SHA256SUMS manifests that coreutils' sha256sum reads and writes alike, and a check that
names the first missing or changed file."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from camelid import checksums
from camelid.errors import CamelidError


@pytest.fixture()
def folder(tmp_path) -> Path:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"\x00\x01" * 1000)
    (tmp_path / "sub" / "b.txt").write_text("hello\n")
    (tmp_path / ".hidden.tmp").write_text("not part of it")
    return tmp_path


def test_a_manifest_lists_every_file_and_checks_them(folder) -> None:
    checksums.write_manifest(folder)
    assert set(checksums.read_manifest(folder)) == {"a.bin", "sub/b.txt"}
    assert checksums.problem(folder) is None
    checksums.verify(folder, "fix it")

    (folder / "sub" / "b.txt").write_text("hellO\n")
    assert checksums.problem(folder) == f"{folder / 'sub' / 'b.txt'}: damaged (its sha256 is not the one SHA256SUMS " \
                                        "recorded when it was written)"
    with pytest.raises(CamelidError, match=r"b\.txt: damaged .*; fix it$"):
        checksums.verify(folder, "fix it")
    (folder / "a.bin").unlink()
    assert checksums.problem(folder).endswith("a.bin: missing (it is listed in SHA256SUMS)")


def test_only_the_files_named_are_listed(folder) -> None:
    checksums.write_manifest(folder, ["a.bin"])
    (folder / "sub" / "b.txt").write_text("changed, and not listed\n")
    assert list(checksums.read_manifest(folder)) == ["a.bin"] and checksums.problem(folder) is None


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="coreutils' sha256sum is not installed")
def test_coreutils_reads_ours_and_we_read_theirs(folder) -> None:
    checksums.write_manifest(folder)
    subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=folder, check=True)
    theirs = subprocess.run(["sha256sum", "--binary", "a.bin", "sub/b.txt"], cwd=folder, check=True,
                            capture_output=True, text=True).stdout  # "<hex> *name": binary mode
    (folder / "SHA256SUMS").write_text(theirs)
    assert set(checksums.read_manifest(folder)) == {"a.bin", "sub/b.txt"} and checksums.problem(folder) is None


@pytest.mark.parametrize("line", ["not a checksum line", "0" * 64 + "  ../outside", "0" * 64 + "  /etc/passwd",
                                  "z" * 64 + "  a.bin"])
def test_a_manifest_that_is_not_one_is_a_one_line_error(folder, line) -> None:
    (folder / "SHA256SUMS").write_text(line + "\n")
    with pytest.raises(CamelidError, match=r"SHA256SUMS:1: not a sha256sum line"):
        checksums.problem(folder)


def test_a_folder_digest_depends_on_names_and_bytes(folder, tmp_path_factory) -> None:
    copy = tmp_path_factory.mktemp("copy") / "f"
    shutil.copytree(folder, copy)
    assert checksums.folder_sha256(copy) == checksums.folder_sha256(folder)
    (copy / "sub" / "b.txt").rename(copy / "sub" / "c.txt")
    assert checksums.folder_sha256(copy) != checksums.folder_sha256(folder)
