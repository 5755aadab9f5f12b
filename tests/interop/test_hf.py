"""Weights cross between camelid and transformers in both directions; bad files give one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import camelid
from camelid import CamelidError, Llama, LlamaConfig
from camelid.interop.hf import config_to_hf, save_hf_dir
from camelid.variants.fused import fuse

transformers = pytest.importorskip("transformers")


def _hf_model(cfg: LlamaConfig) -> torch.nn.Module:
    torch.manual_seed(7)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg))).eval()


@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-llama3"])
def test_transformers_save_then_camelid_load(tmp_path: Path, name: str) -> None:
    cfg = LlamaConfig.from_name(name)
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path)
    llm = camelid.load(tmp_path)
    assert isinstance(llm.model, Llama)
    assert llm.config.replace(name=cfg.name) == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), hf(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-mqa", "tiny-llama3"])
def test_camelid_save_then_transformers_load(tmp_path: Path, name: str) -> None:
    cfg = LlamaConfig.from_name(name)
    model = Llama(cfg).eval()
    camelid.LLM(model=model, config=cfg).save_pretrained(tmp_path)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert not list(tmp_path.glob("*.tmp"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=0)


def test_sharded_checkpoint_round_trip(tmp_path: Path) -> None:
    cfg = LlamaConfig.from_name("tiny-gqa")
    model = Llama(cfg).eval()
    save_hf_dir(model, tmp_path, max_shard_bytes=60_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    back = camelid.load(tmp_path).model
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=0)


def test_bf16_save_keeps_dtype(tmp_path: Path) -> None:
    model = Llama(LlamaConfig.from_name("tiny-gqa"))
    save_hf_dir(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert camelid.load(tmp_path).model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert camelid.load(tmp_path, dtype=torch.float32).model.norm.weight.dtype == torch.float32


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save_hf_dir(Llama(LlamaConfig.from_name("tiny-gqa")), tmp_path)
    return tmp_path


def _one_line_error(path: Path, match: str) -> str:
    with pytest.raises(CamelidError, match=match) as e:
        camelid.load(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_truncated_safetensors(saved: Path) -> None:
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert str(f) in _one_line_error(saved, "corrupt or truncated safetensors")


def test_garbage_safetensors(saved: Path) -> None:
    (saved / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    assert "model.safetensors" in _one_line_error(saved, "corrupt or truncated safetensors")


def test_config_missing_field(saved: Path) -> None:
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (saved / "config.json").write_text(json.dumps(cfg))
    assert "config.json" in _one_line_error(saved, "missing required field 'num_hidden_layers'")


def test_config_contradicts_itself(saved: Path) -> None:
    cfg = json.loads((saved / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (saved / "config.json").write_text(json.dumps(cfg))
    assert "config.json" in _one_line_error(saved, "not a multiple of num_key_value_heads 3")


def test_config_not_json(saved: Path) -> None:
    (saved / "config.json").write_text("{ not json")
    _one_line_error(saved, r"config.json: not valid JSON")


def test_shape_mismatch_names_tensor_and_shapes(saved: Path) -> None:
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 200
    (saved / "config.json").write_text(json.dumps(cfg))
    msg = _one_line_error(saved, r"has shape \[64, 176\] but config.json implies \[64, 200\]")
    assert "model.safetensors" in msg and "model.layers.0.mlp" in msg


def test_missing_and_unexpected_tensors(saved: Path) -> None:
    f = saved / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, f)
    _one_line_error(saved, r"missing tensor\(s\) model.layers.1.mlp.down_proj.weight")
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 176)
    tensors["model.layers.7.mlp.down_proj.weight"] = torch.zeros(64, 176)
    save_file(tensors, f)
    _one_line_error(saved, r"unexpected tensor 'model.layers.7.mlp.down_proj.weight'")


def test_not_a_model_dir(tmp_path: Path) -> None:
    with pytest.raises(CamelidError, match="no such file or directory"):
        camelid.load(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(LlamaConfig.from_name("tiny-gqa"))))
    _one_line_error(tmp_path, "no model.safetensors")


def test_unsupported_architecture(saved: Path) -> None:
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral")
    (saved / "config.json").write_text(json.dumps(cfg))
    _one_line_error(saved, "architecture 'MixtralForCausalLM' is not supported")


def test_a_fused_model_is_refused_with_one_line(tmp_path: Path) -> None:
    model = fuse(Llama(LlamaConfig.from_name("tiny-gqa")).eval())
    with pytest.raises(CamelidError, match="fused projections"):
        save_hf_dir(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
