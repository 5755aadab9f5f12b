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
