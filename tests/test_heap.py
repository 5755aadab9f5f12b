"""camelid.heap: glibc's malloc settings for inference."""

import os
import subprocess
import sys

import pytest

from camelid import heap

glibc = pytest.mark.skipif(heap._malloc_trim() is None, reason="glibc's malloc only")

PROBE = """
import torch
from camelid import heap
from camelid.model import KVCache
before = int(heap.freed_buffers_kept())
KVCache(1, 2, 8, 4, torch.float32)
print(before, heap.freed_buffers_kept())
"""


def _probe(**env: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env},
                         check=True)
    return out.stdout.strip()


@glibc
def test_freed_buffers_are_kept_from_the_first_kv_cache_on() -> None:
    # not at import (a model being converted frees tensors one by one), then set once a KV cache exists
    assert _probe(CAMELID_KEEP_FREED_BUFFERS="1") == "0 True"


@glibc
def test_keeping_freed_buffers_can_be_turned_off() -> None:
    assert _probe(CAMELID_KEEP_FREED_BUFFERS="0") == "0 False"


LOADING_PROBE = """
import ctypes
import torch
from camelid import heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def own_mapping(nbytes):  # whether a buffer of nbytes gets a mapping of its own (not heap memory)
    before = libc.mallinfo2().hblks
    t = torch.empty(nbytes // 4)
    mapped = libc.mallinfo2().hblks > before
    del t
    return int(mapped)

def free_a_large_buffer():  # glibc raises its mmap threshold to the size of a mapped buffer freed
    t = torch.empty((8 << 20) // 4)
    del t

free_a_large_buffer()
seen = [own_mapping(1 << 20)]
with heap.loading():
    with heap.loading():
        free_a_large_buffer()
        seen.append(own_mapping(1 << 20))
    seen.append(own_mapping(1 << 20))
    seen.append(int(heap.freed_buffers_kept()))
seen.append(own_mapping(1 << 20))
seen.append(own_mapping(16 << 20))
seen.append(int(heap.freed_buffers_kept()))
print(*seen)
"""


@pytest.mark.skipif(heap._malloc_trim() is None or not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"),
                    reason="glibc 2.33+ (mallinfo2)")
def test_while_loading_every_large_buffer_is_its_own_mapping() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    out = subprocess.run([sys.executable, "-c", LOADING_PROBE], capture_output=True, text=True, check=True,
                         env={**env, "CAMELID_KEEP_FREED_BUFFERS": "1"}).stdout.split()
    # glibc's own behaviour first: after an 8 MiB buffer was freed, 1 MiB comes from the heap; inside (nested)
    # loading() blocks, a mapping of its own even after a freed 8 MiB buffer; after the outermost block, the
    # inference settings: 1 MiB and 16 MiB from the heap
    assert out == ["0", "1", "1", "0", "0", "0", "1"]


RETURNING_PROBE = LOADING_PROBE.split("free_a_large_buffer()\nseen")[0] + """
from camelid.model import KVCache
seen = [int(heap.return_freed_buffers())]
with heap.loading():
    pass
free_a_large_buffer()
seen.append(own_mapping(1 << 20))
KVCache(1, 2, 8, 4, torch.float32)
free_a_large_buffer()
seen.append(own_mapping(1 << 20))
seen.append(int(heap.freed_buffers_kept()))
print(*seen)
"""


@pytest.mark.skipif(heap._malloc_trim() is None or not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"),
                    reason="glibc 2.33+ (mallinfo2)")
def test_returning_freed_buffers_outlasts_loads_and_kv_caches() -> None:
    # training that asked for every large buffer to be unmapped when freed (FinetuneConfig.return_freed_memory)
    # keeps that through the model's load and any KV cache made later
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", RETURNING_PROBE], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    assert out == ["1", "1", "1", "0"]


def _rss_file_mib() -> float:
    for line in open("/proc/self/status").read().splitlines():  # noqa: SIM115
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def _on_tmpfs(path: str) -> bool:
    best, fs = "", ""
    for line in open("/proc/mounts").read().splitlines():  # noqa: SIM115
        mount, kind = line.split()[1:3]
        if path.startswith(mount) and len(mount) > len(best):
            best, fs = mount, kind
    return fs in ("tmpfs", "ramfs")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's /proc and madvise")
def test_a_read_file_mappings_pages_are_handed_back(tmp_path) -> None:
    import numpy as np

    if _on_tmpfs(str(tmp_path)):
        pytest.skip("tmpfs pages are memory, not file pages that can be read back")
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(1 << 20) * 32)
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    address = mapped.ctypes.data
    assert heap.mapped_file(address) == str(path)
    assert heap.mapped_file(np.zeros(1 << 20, dtype=np.uint8).ctypes.data) is None  # anonymous memory
    before = _rss_file_mib()
    total = int(mapped[::4096].sum())  # every page read
    assert _rss_file_mib() - before > 24
    heap.page_out(address, mapped.nbytes)
    assert _rss_file_mib() - before < 8
    assert int(mapped[::4096].sum()) == total  # read again from the file
