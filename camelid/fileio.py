"""Atomic file writes: a temporary file in the target's folder, then a rename, so that readers (and a
crash) never see half a file. The result gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
Also the small readers several modules share (jsonl lines, the text files under a folder)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, then move the finished file onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write(Path(target), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(target: Path, data: bytes) -> None:
    atomic_write(Path(target), lambda tmp: tmp.write_bytes(data))


def iter_jsonl(path: Path, fix: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a jsonl file; a line that is not JSON is a one-line
    error naming its number and ending in `fix`."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise CamelidError(f"{path}:{n}: not valid JSON ({e.msg}); {fix}") from None


def read_json_or_none(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (a cache that will be rebuilt)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def text_files(paths: list[str | Path], suffixes: tuple[str, ...] = (".txt", ".md")) -> list[Path]:
    """Files as given, directories expanded (recursively, sorted) to their text files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not found:
                raise CamelidError(f"{p}: no {'/'.join(suffixes)} files in this directory")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise CamelidError(f"{p}: no such file or directory")
    return out
