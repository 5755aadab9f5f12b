"""sha256 checksums of files and folders: what a checkpoint, an export or a cached model is checked against.

A folder camelid writes for keeps (a training checkpoint, the export of a run) ends with a `SHA256SUMS` file,
written last and atomically, in the format `sha256sum -c SHA256SUMS` checks:

    3f5a...e1  model.safetensors
    9c0d...77  state.pt

`verify(folder)` reads every listed file once and names the first one that is missing, of another size, or whose
bytes changed. Hashing is one sha256 pass over the bytes (roughly 1 GB/s on one core); the manifest is computed from
the files just written, which are still in the page cache, so writing it costs the hashing alone.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from camelid.errors import CamelidError
from camelid.fileio import atomic_write_text

MANIFEST = "SHA256SUMS"
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_files(folder: Path) -> list[str]:
    """The files under `folder` a manifest covers (relative, '/'-separated, sorted): hidden files (temporary
    ones, camelid's own records) and the manifest itself are left out."""
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() != MANIFEST:
            out.append(rel.as_posix())
    return sorted(out)


def listing(folder: Path, files: Iterable[str] | None = None) -> str:
    """`sha256sum` lines ("<hex>  <relative path>") of `files` (default: every file of the folder), sorted."""
    names = sorted(files) if files is not None else folder_files(folder)
    return "".join(f"{sha256_file(folder / name)}  {name}\n" for name in names)


def folder_sha256(folder: Path) -> str:
    """One digest for a whole folder: the sha256 of its sorted `sha256sum` listing."""
    return hashlib.sha256(listing(folder).encode()).hexdigest()


def write_manifest(folder: Path, files: Iterable[str] | None = None) -> Path:
    """Write folder/SHA256SUMS for `files` (default: every file now in the folder). Call it last."""
    path = Path(folder) / MANIFEST
    atomic_write_text(path, listing(Path(folder), files))
    return path


def has_manifest(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 as SHA256SUMS lists them (a one-line CamelidError if it is not such a file)."""
    path = Path(folder) / MANIFEST
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CamelidError(f"{path}: unreadable ({type(e).__name__}); the folder cannot be checked, restore it "
                           "or delete that file to load the folder unchecked") from None
    out = {}
    for n, line in enumerate(lines, 1):
        digest, mode, name = line[:64], line[64:66], line[66:]  # "<hex>  name" (text) or "<hex> *name" (binary)
        if (mode not in ("  ", " *") or any(c not in "0123456789abcdefABCDEF" for c in digest) or len(digest) != 64
                or not name or ".." in Path(name).parts or Path(name).is_absolute()):
            raise CamelidError(f"{path}:{n}: not a sha256sum line; the folder cannot be checked, restore it or "
                               "delete that file to load the folder unchecked")
        out[name] = digest.lower()
    return out


def problem(folder: Path) -> str | None:
    """None when every file SHA256SUMS lists is there with its checksum, else "<file>: <what is wrong>"."""
    folder = Path(folder)
    for name, digest in read_manifest(folder).items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing (it is listed in {MANIFEST})"
        if sha256_file(path) != digest:
            return f"{path}: damaged (its sha256 is not the one {MANIFEST} recorded when it was written)"
    return None


def verify(folder: Path, fix: str) -> None:
    """Raise a one-line CamelidError naming the first missing or damaged file, ending in `fix`."""
    found = problem(folder)
    if found is not None:
        raise CamelidError(f"{found}; {fix}")
