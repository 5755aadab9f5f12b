from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import camelid
from camelid import CamelidError, Llama, LlamaConfig
from camelid.interop.hf import config_from_hf, config_to_hf

# Published parameter counts (LLaMA papers, model cards); must match within 0.5%.
PUBLISHED = {
    "llama-7b": 6.74e9,
    "llama-13b": 13.02e9,
    "llama-65b": 65.29e9,
    "llama2-70b": 68.98e9,
    "llama3-8b": 8.03e9,
    "llama3.1-405b": 405.85e9,
    "llama3.2-1b": 1.24e9,
    "smollm2-135m": 134.5e6,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_preset_parameter_counts_match_published(name: str) -> None:
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_name(name))
    assert model.num_params() == pytest.approx(PUBLISHED[name], rel=0.005)


@pytest.mark.parametrize("name", LlamaConfig.names())
def test_every_preset_builds_and_round_trips_through_hf_config(name: str) -> None:
    cfg = LlamaConfig.from_name(name)
    back = config_from_hf(config_to_hf(cfg))
    assert back.replace(name=cfg.name) == cfg


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(CamelidError, match="llama3.1-8b") as e:
        LlamaConfig.from_name("llama-9000b")
    assert "llama-9000b" in str(e.value)


def test_from_hf_reads_llama3_rope_scaling_and_head_dim() -> None:
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    }
    cfg = config_from_hf(hf)
    assert cfg == LlamaConfig.from_name("llama3.2-1b").replace(name=cfg.name, eos_token_id=None,
                                                               bos_token_id=None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": None}, "missing required field 'hidden_size'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
        ({"hidden_size": 66}, "not divisible by num_attention_heads"),
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "'GPT2LMHeadModel' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ],
)
def test_bad_hf_config_gives_one_line_error(change: dict, message: str) -> None:
    hf = config_to_hf(LlamaConfig.from_name("tiny-gqa"))
    del hf["head_dim"]
    hf.update(change)
    with pytest.raises(CamelidError, match=message) as e:
        config_from_hf(hf, source="some/dir/config.json")
    assert "some/dir/config.json" in str(e.value)
    assert "\n" not in str(e.value)


def test_contradictory_head_dim_names_the_file() -> None:
    hf = config_to_hf(LlamaConfig.from_name("tiny-gqa"))
    hf["head_dim"] = 15
    with pytest.raises(CamelidError, match=r"^x/config.json: .*head_dim 15 must be even"):
        config_from_hf(hf, source="x/config.json")


# ---------------------------------------------------------------------------------------------------
# every field checked on load: tiny bad config.json files, each a one-line error naming the field and the file


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 1000000}, "num_hidden_layers = 1000000 must be at most 1024"),
        ({"vocab_size": "lots"}, "vocab_size = 'lots' must be an integer"),
        ({"hidden_size": -64}, "hidden_size = -64 must be at least 1"),
        ({"hidden_size": 64.5}, "hidden_size = 64.5 must be an integer"),
        ({"num_attention_heads": 0}, "num_attention_heads = 0 must be at least 1"),
        ({"intermediate_size": 1 << 40}, "intermediate_size = 1099511627776 must be at most"),
        ({"max_position_embeddings": 0}, "max_position_embeddings = 0 must be at least 1"),
        ({"rope_theta": 0}, "rope_theta = 0 must lie in"),
        ({"rope_theta": -1.0}, "rope_theta = -1.0 must lie in"),
        ({"rms_norm_eps": "small"}, "rms_norm_eps = 'small' must be a finite number"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings = 'yes' must be true or false"),
        ({"eos_token_id": -1}, "eos_token_id = -1 must be at least 0"),
        ({"eos_token_id": []}, "eos_token_id is an empty list"),
        ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ({"head_dim": 4096}, "head_dim = 4096 must be at most 1024"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": "big"}}, "rope_scaling.factor = 'big' must be a finite"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
         "rope_scaling.high_freq_factor 1.0 must be above low_freq_factor 4.0"),
        ({"rope_scaling": "llama3"}, "rope_scaling = 'llama3' must be an object or null"),
    ],
)
def test_bad_config_json_fails_fast_naming_field_and_file(tmp_path: Path, change: dict, message: str) -> None:
    hf = config_to_hf(LlamaConfig.from_name("tiny-gqa"))
    hf.update(change)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CamelidError) as e:
        camelid.load(tmp_path)  # fails on the config, before any weights are looked for
    text = str(e.value)
    assert message in text and str(tmp_path / "config.json") in text and "\n" not in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe{not utf-8", "not UTF-8 text"),
        (b"[1, 2, 3]", "holds a JSON list, not an object"),
        (b"{\"hidden_size\": ", "not valid JSON"),
    ],
)
def test_unreadable_config_json(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(CamelidError, match=message) as e:
        camelid.load(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dim": -64}, "dim = -64 must be at least 1"),
        ({"n_layers": True}, "n_layers = True must be an integer"),
        ({"max_seq_len": 0}, "max_seq_len = 0 must be at least 1"),
        ({"rope_theta": float("nan")}, "rope_theta = nan must be a finite number"),
        ({"qkv_bias": "no"}, "qkv_bias = 'no' must be true or false"),
        ({"rope_scaling": {"factor": 8.0, "bogus": 1}}, "rope_scaling {'factor': 8.0, 'bogus': 1} has unknown keys"),
    ],
)
def test_llama_config_checks_its_fields(fields: dict, message: str) -> None:
    with pytest.raises(CamelidError, match="^config 'custom': " + message.replace("(", r"\(").replace("{", r"\{")):
        LlamaConfig(**fields)


def test_from_dict_round_trips_and_refuses_unknown_keys() -> None:
    cfg = LlamaConfig.from_name("tiny-llama3")
    assert LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(CamelidError, match="x.safetensors: unknown config field\\(s\\) attention_sinks"):
        LlamaConfig.from_dict({**cfg.to_dict(), "attention_sinks": 4}, "x.safetensors")
    with pytest.raises(CamelidError, match="^x: config 'tiny-llama3': dim = 0"):
        LlamaConfig.from_dict({**cfg.to_dict(), "dim": 0}, "x")


def test_numpy_integers_are_accepted_as_integers() -> None:
    import numpy as np

    cfg = LlamaConfig(dim=np.int64(64), n_heads=np.int32(4), n_layers=2, vocab_size=100, intermediate_size=128)
    assert type(cfg.dim) is int and cfg.head_dim == 16
