"""Entry point of the `camelid` console script.

Each topic's commands live in their own module and register on the shared `app` when imported; add a
module to `COMMAND_MODULES` to add its commands.

Whatever goes wrong that the user can fix is one line on stderr and exit status 1, never a traceback: a
CamelidError, text that is not UTF-8 (arguments, stdin), and the operating system refusing a read or a write
(a full disk, a read-only folder, a missing permission).
"""

from __future__ import annotations

import importlib
import io
import sys
from typing import Any

from camelid.cli.app import app
from camelid.errors import CamelidError

COMMAND_MODULES = [
    "camelid.cli.info",
    "camelid.cli.bench",
    "camelid.cli.generate",
    "camelid.cli.models",
    "camelid.cli.tokenize",
    "camelid.cli.train",
    "camelid.cli.convert",
    "camelid.cli.bert",
    "camelid.cli.classify",
    "camelid.cli.compare",
    "camelid.cli.quantize",
    "camelid.cli.finetune",
    "camelid.cli.serve",
    "camelid.cli.eval",
    "camelid.cli.vision",
]


class Utf8Stdin(io.TextIOWrapper):
    """stdin decoded as strict UTF-8: bytes that are not UTF-8 are a CamelidError naming stdin (Python's default
    under the C locale lets them through as lone surrogates, which tokenizers refuse with a TypeError)."""

    def read(self, size: int | None = -1) -> str:
        try:
            return super().read(size)
        except UnicodeDecodeError as e:
            raise not_utf8("stdin", e) from None

    def readline(self, size: int | None = -1) -> str:  # what input() calls when stdin is not a terminal
        try:
            return super().readline(size)
        except UnicodeDecodeError as e:
            raise not_utf8("stdin", e) from None

    def __next__(self) -> str:
        try:
            return super().__next__()
        except UnicodeDecodeError as e:
            raise not_utf8("stdin", e) from None


def not_utf8(where: str, e: UnicodeError) -> CamelidError:
    bad = e.object[e.start:e.start + 1] if isinstance(e.object, bytes) else b""
    return CamelidError(f"{where}: not UTF-8 text (byte {bad!r} cannot be decoded); camelid reads text as UTF-8, "
                        "convert it first (e.g. iconv -f latin1 -t utf-8)")


def _strict_stdin() -> None:
    stdin = sys.stdin
    if stdin is None or not isinstance(stdin, io.TextIOWrapper) or isinstance(stdin, Utf8Stdin):
        return  # not a real text stream over bytes (None, a test harness's stand-in): leave it as it is
    _kept.append(stdin)  # the old wrapper would close the shared buffer when collected
    sys.stdin = Utf8Stdin(stdin.buffer, encoding="utf-8", errors="strict", line_buffering=stdin.line_buffering)


_kept: list[Any] = []


def _check_arguments(args: list[str]) -> None:
    """Arguments that were not UTF-8 reach Python as lone surrogates: say so instead of failing later."""
    for n, arg in enumerate(args, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape")[:40]
            raise CamelidError(f"argument {n} ({shown!r}) is not UTF-8 text; camelid reads its arguments as UTF-8") \
                from None


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    text = e.strerror or str(e)
    if e.errno == 28:  # ENOSPC
        return f"{where}no space left on device; free some space and run the command again"
    return f"{where}{text}"


def main(argv: list[str] | None = None) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name)
    from safetensors import SafetensorError

    try:
        _check_arguments(sys.argv[1:] if argv is None else argv)
        _strict_stdin()
        app(args=argv, standalone_mode=True)
    except CamelidError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except UnicodeDecodeError as e:  # text read from a terminal (input()) or elsewhere that was not UTF-8
        print(f"error: {not_utf8('input', e)}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        print(f"error: {_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except SafetensorError as e:  # a write that failed inside the safetensors library (a full disk)
        reason = "no space left on device" if "No space left" in str(e) else " ".join(str(e).split())[:200]
        print(f"error: writing a safetensors file failed ({reason}); free some space or fix the folder, then run "
              "the command again", file=sys.stderr)
        sys.exit(1)
    except BaseException as e:
        if type(e).__name__ != "PanicException":  # pyo3: a Rust library (tokenizers) gave up
            raise
        print(f"error: the tokenizer library failed ({' '.join(str(e).split())[:200]}); the tokenizer file is at "
              "fault, fix or replace it", file=sys.stderr)
        sys.exit(1)


__all__ = ["app", "main"]
