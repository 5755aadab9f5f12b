"""Giving freed memory back to the operating system (glibc's `malloc_trim`).

glibc's malloc keeps the memory a program frees for its next allocations: pages freed between long-lived
allocations stay resident and count in the process's RSS, and in its peak if more is allocated later. A loader
that converts a model tensor after tensor frees a slice's temporaries between the buffers it keeps, so those
pages pile up (tens of MiB for a 135M-parameter model) unless they are handed back. `trim()` hands them back
on glibc and does nothing on other C libraries (musl, macOS, Windows), whose allocators have no such call.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def trim() -> None:
    """Return the C heap's free pages to the OS (a fraction of a millisecond for a small heap)."""
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)
