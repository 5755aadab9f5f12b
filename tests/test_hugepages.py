from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import peaked_model
from safetensors.torch import load_file, save_file

from camelid import hugepages
from camelid.variants.quantized import quantize_model

needs_thp = pytest.mark.skipif(not hugepages.available(),
                               reason="transparent huge pages are off (or not Linux): nothing is moved")


@needs_thp
def test_fp32_weights_end_up_in_huge_pages() -> None:
    model = quantize_model(peaked_model("tiny-gqa", tie_embeddings=True), "fp32")
    w13 = model.layers[0].feed_forward.w13.weight
    # the kernel may refuse a huge page when its memory is too fragmented; here 24 GiB are mostly free
    assert hugepages.huge_bytes(w13) >= hugepages.HUGE_PAGE
    assert w13.data_ptr() % hugepages.ALIGN == 0
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()  # still tied: one copy
    if "[madvise]" in hugepages.THP_SETTING.read_text():  # (with `always`, PyTorch's own memory may be huge too)
        kept = quantize_model(peaked_model("tiny-gqa", tie_embeddings=True), "fp32", huge_pages=False)
        assert hugepages.huge_bytes(kept.layers[0].feed_forward.w13.weight) == 0


@needs_thp
def test_moved_weights_keep_values_types_and_outputs() -> None:
    base = peaked_model("tiny-gqa")
    ref = quantize_model(copy.deepcopy(base), "fp32", huge_pages=False)
    moved = quantize_model(base, "fp32")
    a, b = ref.state_dict(), moved.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k
    def kinds(m: torch.nn.Module) -> list[tuple[str, type, bool]]:
        return [(n, type(p), p.requires_grad) for n, p in m.named_parameters()]

    assert kinds(moved) == kinds(ref)
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.inference_mode():
        torch.testing.assert_close(moved(ids), ref(ids))


@needs_thp
def test_moved_tensors_have_storages_of_their_own(tmp_path: Path) -> None:
    """One mapping holds them all, but each has its own storage, so safetensors saves them as before."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 64, bias=False))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    assert hugepages.move_to_huge_pages(model) >= 2 * 64 * 32 * 4
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    got = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@needs_thp
def test_skipped_tensors_stay_where_they_are() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 64, bias=False))
    stay = model[0].weight
    moved = hugepages.move_to_huge_pages(model, skip={stay.data_ptr()})
    assert model[0].weight is stay
    assert moved == 64 * 32 * 4 and model[1].weight.data_ptr() != stay.data_ptr()


def test_nothing_moves_where_huge_pages_are_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "THP_SETTING", setting)
    assert not hugepages.available()
    model = torch.nn.Linear(64, 32, bias=False)
    w = model.weight
    assert hugepages.move_to_huge_pages(model) == 0 and model.weight is w
    monkeypatch.setattr(hugepages, "THP_SETTING", tmp_path / "missing")
    assert not hugepages.available()


def test_camelid_huge_pages_0_keeps_the_weights_where_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMELID_HUGE_PAGES", "0")
    model = torch.nn.Linear(64, 32, bias=False)
    w = model.weight
    assert hugepages.move_to_huge_pages(model) == 0 and model.weight is w
