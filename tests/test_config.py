from __future__ import annotations

import pytest
import torch

from camelid import CamelidError, Llama, LlamaConfig

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
    back = LlamaConfig.from_hf(cfg.to_hf())
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
    cfg = LlamaConfig.from_hf(hf)
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
    hf = LlamaConfig.from_name("tiny-gqa").to_hf()
    del hf["head_dim"]
    hf.update(change)
    with pytest.raises(CamelidError, match=message) as e:
        LlamaConfig.from_hf(hf, source="some/dir/config.json")
    assert "some/dir/config.json" in str(e.value)
    assert "\n" not in str(e.value)


def test_contradictory_head_dim_names_the_file() -> None:
    hf = LlamaConfig.from_name("tiny-gqa").to_hf()
    hf["head_dim"] = 15
    with pytest.raises(CamelidError, match=r"^x/config.json: .*head_dim 15 must be even"):
        LlamaConfig.from_hf(hf, source="x/config.json")
