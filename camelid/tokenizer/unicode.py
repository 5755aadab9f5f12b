"""Unicode as llama.cpp's tokenizers see it: each code point's general category (N, L, P, M, S, Z, C or
unassigned), the White_Space set, and the "collapsed" text its pre-tokenizer regexes run on.

llama.cpp's tables are generated from Unicode 15.1, whatever Python's own `unicodedata` is; the same facts live
in camelid/data/unicode-15.1.txt, written by `python -m camelid.tokenizer.unicode` from `unicodedata2==15.1.0`
(install it only to regenerate the file). One line per range of equal category: `START CATEGORY` (hex, letter).
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

import numpy as np

MAX_CODEPOINT = 0x110000
# White_Space (PropList.txt), the set llama.cpp uses
WHITESPACE = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                        0x202F, 0x205F, 0x3000])
# general category -> the one letter the table uses ("U": unassigned)
CATEGORY_LETTERS = {"N": "N", "L": "L", "P": "P", "M": "M", "S": "S", "Z": "Z", "C": "C"}
# the byte that stands for a non-ASCII code point of each category in the collapsed text (llama.cpp's choice);
# whitespace collapses to \v, anything else (C, Z, unassigned) to 0xD0
COLLAPSED = {"N": 0xD1, "L": 0xD2, "P": 0xD3, "M": 0xD4, "S": 0xD5}
COLLAPSED_WHITESPACE, COLLAPSED_OTHER = 0x0B, 0xD0
TABLE_FILE = "unicode-15.1.txt"


@cache
def categories() -> np.ndarray:
    """Category letter (as a byte) of every code point, a uint8 array of 0x110000."""
    text = resources.files("camelid").joinpath("data", TABLE_FILE).read_text(encoding="ascii")
    rows = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    starts = [int(start, 16) for start, _ in rows] + [MAX_CODEPOINT]
    table = np.zeros(MAX_CODEPOINT, dtype=np.uint8)
    for (_, letter), a, b in zip(rows, starts, starts[1:], strict=False):
        table[a:b] = ord(letter)
    return table


def category(cpt: int) -> str:
    return chr(categories()[cpt])


@cache
def _collapse_table() -> np.ndarray:
    cats = categories()
    table = np.full(MAX_CODEPOINT, COLLAPSED_OTHER, dtype=np.uint8)
    for letter, byte in COLLAPSED.items():
        table[cats == ord(letter)] = byte
    table[list(WHITESPACE)] = COLLAPSED_WHITESPACE
    table[:128] = np.arange(128, dtype=np.uint8)
    return table


def collapse(text: str) -> str:
    """One character per code point: ASCII kept, every other code point replaced by the byte of its category
    (whitespace by \\v). Regexes over categories then need only single bytes, as in llama.cpp's unicode.cpp."""
    if text.isascii():
        return text
    cpts = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return _collapse_table()[cpts].tobytes().decode("latin-1")


_NON_ASCII_WHITESPACE = re.compile("[" + "".join(chr(c) for c in sorted(WHITESPACE) if c > 0x7F) + "]")


def ascii_whitespace(text: str) -> str:
    """Non-ASCII whitespace replaced by \\v: llama.cpp's regexes without categories see \\s as ASCII only."""
    return _NON_ASCII_WHITESPACE.sub("\x0b", text)


def is_letter(c: str) -> bool:
    return categories()[ord(c)] == ord("L")


def is_number(c: str) -> bool:
    return categories()[ord(c)] == ord("N")


def is_whitespace(c: str) -> bool:
    return ord(c) in WHITESPACE


def write_table(path: str) -> None:
    """Regenerate the table from `unicodedata2` (which must be Unicode 15.1)."""
    import unicodedata2  # type: ignore[import-not-found]

    assert unicodedata2.unidata_version == "15.1.0", unicodedata2.unidata_version
    lines = ["# general category of every code point, Unicode 15.1 (as llama.cpp's unicode-data.cpp): "
             "START CATEGORY, U = unassigned"]
    previous = None
    for cpt in range(MAX_CODEPOINT):
        cat = unicodedata2.category(chr(cpt))
        letter = "U" if cat == "Cn" else CATEGORY_LETTERS[cat[0]]
        if letter != previous:
            lines.append(f"{cpt:X} {letter}")
            previous = letter
    with open(path, "w", encoding="ascii") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_table(str(resources.files("camelid").joinpath("data", TABLE_FILE)))
