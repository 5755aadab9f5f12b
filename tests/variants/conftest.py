from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from camelid.ops import native


@pytest.fixture
def no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every op as on a machine without the C++ kernels (each must fall back by itself)."""
    monkeypatch.setattr(native, "module", lambda: None)
    monkeypatch.setattr(native, "loaded", lambda: None)


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
