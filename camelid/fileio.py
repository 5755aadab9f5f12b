"""Atomic file writes: a temporary file in the target's folder, then a rename, so that readers (and a
crash) never see half a file. The result gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
Also the small readers and checks several modules share (jsonl lines, the text files under a folder, corpus files
that are empty or binary, an output folder that is a file)."""

from __future__ import annotations

import json
import os
import sys
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
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CamelidError(f"{path}:{n}: not UTF-8 text (a binary file?); {fix}") from None
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


def warn(message: str) -> None:
    """A warning the user should read: one line on stderr."""
    print(f"camelid: warning: {' '.join(message.split())}", file=sys.stderr)


def check_output_folder(path: str | Path, option: str = "--out") -> None:
    """A folder about to be written into: a one-line error when it, or a folder above it, is an existing file."""
    path = Path(path)
    for p in [path, *path.parents]:
        if p.exists():
            if not p.is_dir():
                raise CamelidError(f"{p}: an existing file, not a folder; {option} {path} needs a folder there: "
                                   f"choose another {option} or move the file away")
            return


def text_problem(raw: bytes) -> str | None:
    """Why `raw` does not look like text (NUL bytes, or more than 1% of it undecodable or control characters),
    or None."""
    if b"\0" in raw:
        return "it holds NUL bytes: a binary file, not text"
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    controls = sum(1 for c in text if c < " " and c not in "\t\n\r\f\v")
    share = (bad + controls) / max(1, len(text))
    if share > 0.01:
        return f"{share:.0%} of it is not UTF-8 text: a binary file, or text in another encoding"
    return None


def check_corpus_file(path: Path, sample: int = 1 << 20) -> bool:
    """False when a corpus file is empty (nothing but whitespace); a warning on stderr when its first `sample`
    bytes do not look like text."""
    with open(path, "rb") as f:
        head = f.read(sample)
    if not head.strip() and Path(path).stat().st_size <= sample:
        return False
    if problem := text_problem(head):
        warn(f"{path}: {problem}; it is read with replacement characters, check that it belongs in the corpus")
    return True


def read_corpus_file(path: Path) -> str:
    """A text file of a training corpus as UTF-8 (undecodable bytes replaced by U+FFFD), with a warning on stderr
    when it does not look like text."""
    raw = Path(path).read_bytes()
    if problem := text_problem(raw):
        warn(f"{path}: {problem}; it is read with replacement characters, check that it belongs in the corpus")
    return raw.decode("utf-8", errors="replace")


def refuse_or_warn_empty(empty: list[Path], total: int) -> None:
    """Corpus files with no text: an error when every one of the `total` inputs is empty, else a warning each."""
    if empty and len(empty) == total:
        names = ", ".join(map(str, empty[:3])) + (" ..." if len(empty) > 3 else "")
        raise CamelidError(f"{names}: empty; there is no text to train on, give files with text")
    for path in empty:
        warn(f"{path}: empty; it adds nothing to the corpus")
