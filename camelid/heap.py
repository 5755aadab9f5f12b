"""Giving freed memory back to the operating system (glibc's `malloc_trim`).

glibc's malloc keeps the memory a program frees for its next allocations: pages freed between long-lived
allocations stay resident and count in the process's RSS, and in its peak if more is allocated later. A loader
that converts a model tensor after tensor frees a slice's temporaries between the buffers it keeps, so those
pages pile up (tens of MiB for a 135M-parameter model) unless they are handed back. `trim()` hands them back
on glibc and does nothing on other C libraries (musl, macOS, Windows), whose allocators have no such call.

The other way round, `keep_freed_buffers()` (called when a model's first KV cache is made: inference from then
on) keeps freed buffers of up to 32 MiB in the heap for the next allocations. By default glibc
gives each buffer above a threshold its own mapping and unmaps it when freed, so a prompt's activations, a few MiB
per layer, were mapped and faulted in page by page again at every layer: a 512-token int8 prefill of SmolLM2
loaded from a `camelid quantize` file ran at 650-830 tok/s, and at 930-1030 with the buffers kept (2 threads, AMD
EPYC). Not during a load: `loading()` pins glibc's threshold at its default while a model is read and converted,
because tensors freed one by one would stay in the heap and raise the peak. `CAMELID_KEEP_FREED_BUFFERS=0` leaves
malloc's defaults.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path


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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # glibc's largest: buffers up to this size come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory at the heap's top kept before free() hands it back (trim() still does)
LOADING_MMAP_THRESHOLD = 128 << 10  # glibc's default: while loading, every larger buffer is a mapping of its own

_lock = threading.Lock()
_loads = 0  # `loading()` blocks open
_kept: bool | None = None  # keep_freed_buffers' answer once given
_returning: int | None = None  # the threshold return_freed_buffers() set: it stays in force


@lru_cache(maxsize=1)
def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, or None on another C library."""
    if _malloc_trim() is None:
        return None
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt for camelid's own settings, or None: another C library, or CAMELID_KEEP_FREED_BUFFERS=0
    (malloc's defaults left alone)."""
    return None if os.environ.get("CAMELID_KEEP_FREED_BUFFERS", "1") == "0" else _glibc_mallopt()


def keep_freed_buffers() -> bool:
    """Have glibc serve buffers of up to MMAP_THRESHOLD from its heap and keep up to TRIM_THRESHOLD of freed memory
    at the heap's top, instead of a mapping per large buffer that is unmapped when freed; True if set. Nothing on
    other C libraries, with CAMELID_KEEP_FREED_BUFFERS=0 or after `return_freed_buffers`; inside `loading()`, set
    when the load ends."""
    global _kept
    with _lock:
        if _loads or _returning is not None:
            return False
        if _kept is None:
            mallopt = _mallopt()
            _kept = mallopt is not None and _thresholds(mallopt, MMAP_THRESHOLD, TRIM_THRESHOLD)
        return _kept


def _thresholds(mallopt: Callable[[int, int], int], mmap: int, trim: int) -> bool:
    """glibc's mmap and trim thresholds set; True if both took."""
    return bool(mallopt(M_MMAP_THRESHOLD, mmap)) and bool(mallopt(M_TRIM_THRESHOLD, trim))


def freed_buffers_kept() -> bool:
    """Whether keep_freed_buffers' settings are in force."""
    return bool(_kept) and not _loads and _returning is None


def return_freed_buffers(threshold: int = LOADING_MMAP_THRESHOLD) -> bool:
    """For the rest of the process, every buffer over `threshold` bytes its own mapping, unmapped when freed (a
    fixed threshold also stops glibc raising it as large buffers are freed, which would leave freed activations
    in its heap); `keep_freed_buffers` and the end of a load leave it so. Fewer resident pages, more page faults:
    for training that puts memory before speed (FinetuneConfig.return_freed_memory). True if set; nothing on
    other C libraries."""
    global _returning, _kept
    mallopt = _glibc_mallopt()
    with _lock:
        if mallopt is None or not mallopt(M_MMAP_THRESHOLD, threshold):
            return False
        _returning, _kept = threshold, None
        return True


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """While a model is read and converted: glibc's mmap threshold pinned at its default, 128 KiB, so that every
    larger buffer the loader frees is unmapped at once. Left alone, glibc raises the threshold to the size of
    each mapped buffer freed (up to 32 MiB), and later buffers of that size come from the heap, where their pages
    stay between the buffers that are kept: loading SmolLM2 from an F32 GGUF peaked at 771 MiB instead of 514
    (benchmarks/README.md, "Peak memory from a GGUF file"). glibc has no way back to its own dynamic threshold, so
    when the outermost block ends the settings are: return_freed_buffers' where it was asked for,
    keep_freed_buffers' where they were in force, else the threshold glibc's own reaches after a load (32 MiB;
    free memory at the heap's top kept up to twice that). Nested blocks and threads share one count. Nothing on
    other C libraries, or with CAMELID_KEEP_FREED_BUFFERS=0."""
    global _loads
    mallopt = _mallopt()
    if mallopt is None:
        yield
        return
    with _lock:
        if _loads == 0:
            mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD)
        _loads += 1
    try:
        yield
    finally:
        with _lock:
            _loads -= 1
            if _loads == 0:
                if _returning is not None:
                    mallopt(M_MMAP_THRESHOLD, _returning)
                else:  # an inference process's settings, else where glibc's own threshold ends up after a load
                    _thresholds(mallopt, MMAP_THRESHOLD, TRIM_THRESHOLD if _kept else 2 * MMAP_THRESHOLD)


MADV_RANDOM, MADV_PAGEOUT = 1, 21  # Linux (MADV_PAGEOUT: 5.4+)


def mapped_file(address: int) -> str | None:
    """The file that the mapping holding `address` maps (/proc/self/maps), or None: anonymous memory, or where
    that cannot be read."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def _madvise(address: int, nbytes: int, advice: int) -> None:
    """madvise() over the whole pages inside [address, address + nbytes); nothing where there is no such call."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    start, end = -(-address // page) * page, (address + nbytes) // page * page
    if end <= start or not sys.platform.startswith("linux"):
        return
    madvise = getattr(ctypes.CDLL(None), "madvise", None)
    if madvise is not None:
        madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        madvise(start, end - start, advice)


def page_out(address: int, nbytes: int) -> None:
    """Drop the pages of [address, address + nbytes) from this process (MADV_PAGEOUT), for a range of a file
    mapping that was only read: they leave the RSS and come back from the file (the page cache) when read again.
    File mappings only: on anonymous memory it would push the pages to swap."""
    _madvise(address, nbytes, MADV_PAGEOUT)


def read_randomly(address: int, nbytes: int) -> None:
    """Tell the kernel that [address, address + nbytes) of a file mapping is read a row here and there
    (MADV_RANDOM): a read maps in its own page, not the 64 KiB around it (1,000 random rows of SmolLM2's
    F32 head: 5.7 MiB resident instead of 50)."""
    _madvise(address, nbytes, MADV_RANDOM)
