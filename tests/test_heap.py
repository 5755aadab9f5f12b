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


class _Mallopt:
    """A stand-in for glibc's mallopt that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.fixture
def mallopt(monkeypatch: pytest.MonkeyPatch) -> _Mallopt:
    """heap's settings from a fresh process, glibc's mallopt recorded instead of called."""
    recorder = _Mallopt()
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: recorder)
    monkeypatch.setattr(heap, "_loads", 0)
    monkeypatch.setattr(heap, "_kept", None)
    monkeypatch.setattr(heap, "_returning", None)
    monkeypatch.setenv("CAMELID_KEEP_FREED_BUFFERS", "1")
    return recorder


PIN = (heap.M_MMAP_THRESHOLD, 128 << 10)  # glibc's default threshold, pinned
KEEP = [(heap.M_MMAP_THRESHOLD, 32 << 20), (heap.M_TRIM_THRESHOLD, 256 << 20)]  # inference


def test_a_load_pins_the_threshold_then_leaves_glibcs_usual_settings(mallopt: _Mallopt) -> None:
    with heap.loading():
        with heap.loading():  # nested: one pin
            assert not heap.keep_freed_buffers()  # a KV cache made inside a load: not yet
        assert mallopt.calls == [PIN] and not heap.freed_buffers_kept()
    # the threshold glibc's own dynamic one reaches after a load, and twice that kept at the heap's top
    assert mallopt.calls == [PIN, (heap.M_MMAP_THRESHOLD, 32 << 20), (heap.M_TRIM_THRESHOLD, 64 << 20)]
    assert not heap.freed_buffers_kept()
    del mallopt.calls[:]
    assert heap.keep_freed_buffers() and heap.keep_freed_buffers() and mallopt.calls == KEEP  # set once
    with heap.loading():  # a second model in an inference process: pinned, then the inference settings again
        pass
    assert mallopt.calls == [*KEEP, PIN, *KEEP] and heap.freed_buffers_kept()


def test_returning_freed_buffers_outlasts_loads_and_kv_caches(mallopt: _Mallopt) -> None:
    # training that asked for every large buffer to be unmapped when freed (FinetuneConfig.return_freed_memory)
    # keeps that through the model's load and any KV cache made later
    assert heap.return_freed_buffers(256 << 10)
    with heap.loading():
        pass
    assert not heap.keep_freed_buffers() and not heap.freed_buffers_kept()
    threshold = heap.M_MMAP_THRESHOLD
    assert mallopt.calls == [(threshold, 256 << 10), PIN, (threshold, 256 << 10)]


def test_loading_leaves_malloc_alone_when_turned_off(mallopt: _Mallopt, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMELID_KEEP_FREED_BUFFERS", "0")
    with heap.loading():
        pass
    assert not heap.keep_freed_buffers() and mallopt.calls == []


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
