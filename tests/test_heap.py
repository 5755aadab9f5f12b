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
before = heap.keep_freed_buffers.cache_info().currsize
KVCache(1, 2, 8, 4, torch.float32)
print(before, heap.keep_freed_buffers())
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
