"""Transparent huge pages (2 MiB) for the weights a decode step streams.

A batch-1 fp32 decode step reads every weight once per token (538 MB for SmolLM2-135M), so it runs at the
speed of memory. In 4 KiB pages that read takes a TLB miss every 4 KiB and the CPU's prefetchers stop at every
page boundary; in 2 MiB pages neither happens. Linux backs an anonymous private mapping with huge pages when
transparent huge pages are `always`, or `madvise` and the mapping asks (MADV_HUGEPAGE) before its pages are first
written. PyTorch's allocator never asks, so `move_to_huge_pages` copies weight tensors into one such mapping
(one for all of them: a mapping per tensor would round each up to 2 MiB of memory). On a 2-core AMD EPYC the
fp32 decode step of SmolLM2-135M ran 5-7% faster at 1 thread (benchmarks/huge_pages.py). The price is paid at
load: to find free 2 MiB blocks the kernel may have to compact memory first, which took from 0.03 s to 3.5 s
for those 538 MB on a busy machine. `CAMELID_HUGE_PAGES=0` keeps the weights where PyTorch put them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from camelid import heap

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor starts on a cache line
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """True where the kernel gives huge pages to a mapping that asks: Linux with THP `always` or `madvise`."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def _mapping(nbytes: int) -> tuple[mmap.mmap, int]:
    """An anonymous private mapping advised to use huge pages, and the offset of its first 2 MiB boundary, from
    which `nbytes` (rounded up to whole huge pages) are usable. The bytes before that offset are never touched,
    so they cost address space, not memory."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    mm = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)
    start = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
    return mm, -start % HUGE_PAGE


MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault a range in now, in one call


class Arena:
    """One huge-page mapping handed out tensor by tensor, for a loader that writes every weight straight into place
    (no second copy, as `move_to_huge_pages` makes). The whole mapping is faulted in at once
    (MADV_POPULATE_WRITE): 4 GiB in 0.3 s on a 2-core AMD EPYC VM where touching it page by page took 6.3 s
    (2 MiB pages) or 9.4 s (4 KiB), though a first 8 GiB right after a large load took 15 s (the VM's host backing
    the memory)."""

    def __init__(self, nbytes: int) -> None:
        self._mm, self._offset = _mapping(nbytes)
        self._end = self._offset + nbytes
        # an older kernel refuses (OSError): then the pages fault in as they are written
        with contextlib.suppress(OSError):
            self._mm.madvise(MADV_POPULATE_WRITE, self._offset, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised tensor in the mapping (a plain torch.empty once the mapping is used up)."""
        count = torch.Size(shape).numel()
        size = -(-count * dtype.itemsize // ALIGN) * ALIGN
        if count == 0 or self._offset + size > self._end:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(self._mm, dtype=dtype, count=count, offset=self._offset).view(shape)
        self._offset += size
        return t


def arena_for(shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> Arena | None:
    """An Arena with room for tensors of these shapes and dtypes; None where huge pages are not available or
    CAMELID_HUGE_PAGES=0."""
    if os.environ.get("CAMELID_HUGE_PAGES") == "0" or not available() or not shapes:
        return None
    return Arena(sum(-(-torch.Size(s).numel() * d.itemsize // ALIGN) * ALIGN for s, d in shapes))


@torch.no_grad()
def move_to_huge_pages(model: nn.Module, skip: set[int] | None = None) -> int:
    """Copy the model's weight matrices (parameters and buffers of 2 or more dimensions) into one huge-page
    mapping, in place, one tensor at a time, so that each old tensor is freed as its copy is made and resident
    memory does not grow. Tensors sharing memory (a tied embedding and head) stay shared. `skip`: data pointers
    of tensors to leave where they are (memory-mapped from a file). Returns the bytes moved: 0 where huge pages
    are not available or CAMELID_HUGE_PAGES=0."""
    if os.environ.get("CAMELID_HUGE_PAGES") == "0" or not available():
        return 0
    skip = skip or set()
    slots: dict[tuple[int, tuple[int, ...], torch.dtype], list[tuple[dict[str, Tensor | None], str]]] = {}
    for mod in model.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None or t.dim() < 2 or t.device.type != "cpu" or not t.is_contiguous() or t.is_meta:
                    continue
                if t.data_ptr() in skip:
                    continue
                slots.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), []).append((table, name))
    if not slots:
        return 0
    sizes = {key: -(-torch.Size(key[1]).numel() * key[2].itemsize // ALIGN) * ALIGN for key in slots}
    mm, offset = _mapping(sum(sizes.values()))
    for key, places in slots.items():
        shape, dtype = key[1], key[2]
        old = places[0][0][places[0][1]]
        assert old is not None
        # its own storage per tensor (torch.frombuffer over the shared mapping): no two tensors share a storage,
        # so savers that refuse shared storages (safetensors) take them as before
        new = torch.frombuffer(mm, dtype=dtype, count=torch.Size(shape).numel(), offset=offset).view(shape)
        new.copy_(old)
        for table, name in places:
            t = table[name]
            table[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        del old, t
        offset += sizes[key]
    heap.trim()  # the old tensors' pages that glibc's heap kept
    return offset


def huge_bytes(t: Tensor) -> int:
    """Bytes of huge pages resident in the mapping that holds `t` (/proc/self/smaps' AnonHugePages); 0 where
    that cannot be read."""
    address = t.data_ptr()
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    inside = False
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0
