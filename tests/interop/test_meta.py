"""Meta checkpoints (params.json + consolidated.NN.pth): round trips, shard layout, and the published numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import camelid
from camelid import CamelidError, Llama, LlamaConfig
from camelid.config import RopeScaling
from camelid.interop.meta import load_meta_dir, meta_ffn_dim, save_meta_dir

SCALED = LlamaConfig.from_name("tiny-gqa", rope_scaling=RopeScaling(factor=8.0), rope_theta=500000.0,
                               max_seq_len=256)


def _model(cfg: LlamaConfig) -> Llama:
    torch.manual_seed(3)
    return Llama(cfg).eval()


@pytest.mark.parametrize("cfg", [LlamaConfig.from_name("tiny-mha"), LlamaConfig.from_name("tiny-gqa"), SCALED],
                         ids=["mha", "gqa", "llama3.1-scaled-rope"])
@pytest.mark.parametrize("n_shards", [1, 2])
def test_round_trip_logits_equal(tmp_path: Path, cfg: LlamaConfig, n_shards: int) -> None:
    model = _model(cfg)
    save_meta_dir(model, tmp_path, n_shards=n_shards)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"consolidated.{i:02d}.pth" for i in range(n_shards)] + [
        "params.json"]
    params = json.loads((tmp_path / "params.json").read_text())
    assert params.get("use_scaled_rope", False) == (cfg.rope_scaling is not None)
    assert meta_ffn_dim(params["dim"], params["multiple_of"], params["ffn_dim_multiplier"]) == cfg.intermediate_size
    config, back = load_meta_dir(tmp_path)
    assert config.rope_scaling == cfg.rope_scaling and config.n_kv_heads == cfg.n_kv_heads
    ids = torch.randint(0, cfg.vocab_size, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), atol=0, rtol=0)


def test_model_parallel_split_follows_meta(tmp_path: Path) -> None:
    cfg = LlamaConfig.from_name("tiny-gqa")
    model = _model(cfg)
    save_meta_dir(model, tmp_path, n_shards=2)
    s0 = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    s1 = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    full = model.state_dict()
    for name in ("layers.0.attention.wq.weight", "layers.0.attention.wk.weight", "layers.0.attention.wv.weight",
                 "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w3.weight", "output.weight"):
        assert s0[name].shape[0] * 2 == full[name].shape[0] and s0[name].shape[1] == full[name].shape[1], name
    for name in ("layers.1.attention.wo.weight", "layers.1.feed_forward.w2.weight", "tok_embeddings.weight"):
        assert s0[name].shape[1] * 2 == full[name].shape[1] and s0[name].shape[0] == full[name].shape[0], name
    for name in ("norm.weight", "layers.0.attention_norm.weight", "layers.1.ffn_norm.weight"):
        assert torch.equal(s0[name], full[name]) and torch.equal(s1[name], full[name]), name
    # a row-parallel split: concatenating the shards' columns gives the weight back
    assert torch.equal(torch.cat([s0["layers.1.feed_forward.w2.weight"], s1["layers.1.feed_forward.w2.weight"]], 1),
                       full["layers.1.feed_forward.w2.weight"])


def test_rotary_permutation_matches_transformers(tmp_path: Path) -> None:
    """transformers undoes the interleaved (Meta / llama.cpp) q/k order with its own function; applied to what we
    wrote, it must give back camelid's (HF-layout) weights."""
    pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    cfg = LlamaConfig.from_name("tiny-gqa")
    model = _model(cfg)
    save_meta_dir(model, tmp_path)
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    for layer in range(cfg.n_layers):
        wq = sd[f"layers.{layer}.attention.wq.weight"].numpy()
        wk = sd[f"layers.{layer}.attention.wk.weight"].numpy()
        attn = model.layers[layer].attention
        assert not torch.equal(torch.from_numpy(wq), attn.wq.weight)  # it really is permuted on disk
        assert torch.equal(torch.from_numpy(undo(wq, cfg.n_heads, cfg.n_heads)), attn.wq.weight)
        assert torch.equal(torch.from_numpy(undo(wk, cfg.n_heads, cfg.n_kv_heads)), attn.wk.weight)


@pytest.mark.parametrize(
    "params, preset",
    [  # params.json as Meta published them
        ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1},
         "llama-7b"),
        ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
          "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}, "llama2-70b"),
        ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0}, "llama3-8b"),
        ({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "multiple_of": 1024,
          "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True},
         "llama3.1-8b"),
        ({"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 8, "vocab_size": 128256,
          "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "norm_eps": 1e-05, "rope_theta": 500000.0,
          "use_scaled_rope": True}, "llama3.1-405b"),
    ],
)
def test_published_params_give_the_published_configs(params: dict, preset: str) -> None:
    from camelid.interop.meta import config_from_params, params_from_config

    want = LlamaConfig.from_name(preset)
    vocab = want.vocab_size if params["vocab_size"] == -1 else params["vocab_size"]
    got = config_from_params(params, vocab, "params.json")
    assert got.replace(name=want.name) == want
    # and what we write reproduces the same model
    back = params_from_config(want)
    assert meta_ffn_dim(back["dim"], back["multiple_of"], back["ffn_dim_multiplier"]) == want.intermediate_size
    assert config_from_params(back, vocab, "params.json").replace(name=want.name, max_seq_len=want.max_seq_len) == want


def test_vocab_minus_one_and_llama3_vocab_parallel_embedding(tmp_path: Path) -> None:
    cfg = LlamaConfig.from_name("tiny-gqa")
    model = _model(cfg)
    save_meta_dir(model, tmp_path, n_shards=2)
    params = json.loads((tmp_path / "params.json").read_text())
    params["vocab_size"] = -1  # Llama 1/2 leave it to the tokenizer
    (tmp_path / "params.json").write_text(json.dumps(params))
    # re-split the embedding by vocabulary rows, as Llama 3's VocabParallelEmbedding does
    emb = model.tok_embeddings.weight.detach()
    for i, part in enumerate(emb.chunk(2, dim=0)):
        f = tmp_path / f"consolidated.{i:02d}.pth"
        sd = torch.load(f, weights_only=True)
        sd["tok_embeddings.weight"] = part.clone()
        torch.save(sd, f)
    llm = camelid.load(tmp_path, tokenizer=False)
    assert llm.config.vocab_size == cfg.vocab_size
    ids = torch.randint(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), model(ids), atol=0, rtol=0)


def test_tied_model_round_trips_tied(tmp_path: Path) -> None:
    cfg = LlamaConfig.from_name("tiny-gqa", tie_embeddings=True)
    model = _model(cfg)
    save_meta_dir(model, tmp_path)
    config, back = load_meta_dir(tmp_path)
    assert config.tie_embeddings and back.output.weight is back.tok_embeddings.weight


def test_bf16_save(tmp_path: Path) -> None:
    model = _model(LlamaConfig.from_name("tiny-mqa"))
    save_meta_dir(model, tmp_path, dtype=torch.bfloat16)
    _, back = load_meta_dir(tmp_path)
    assert back.layers[0].attention.wk.weight.dtype == torch.bfloat16
    assert torch.equal(back.layers[0].attention.wk.weight, model.layers[0].attention.wk.weight.bfloat16())


# ---------------------------------------------------------------------------------------------------
# bad input


def _one_line(path: Path, match: str) -> str:
    with pytest.raises(CamelidError, match=match) as e:
        load_meta_dir(path)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    save_meta_dir(_model(LlamaConfig.from_name("tiny-gqa")), tmp_path)
    return tmp_path


def test_truncated_shard(saved: Path) -> None:
    f = saved / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _one_line(saved, "consolidated.00.pth: cannot be read as a weights-only PyTorch checkpoint")


def test_pickled_code_is_refused(saved: Path) -> None:
    f = saved / "consolidated.00.pth"
    torch.save({"tok_embeddings.weight": torch.zeros(2), "evil": Path("/")}, f)  # not a plain tensor
    _one_line(saved, "weights-only")


def test_missing_shards_and_params(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    (saved / "consolidated.00.pth").unlink()
    _one_line(saved, "no consolidated.*.pth")
    (saved / "params.json").write_text("{bad")
    _one_line(saved, "params.json: not valid JSON")
    empty = tmp_path_factory.mktemp("empty")
    _one_line(empty, "no params.json")


def test_params_missing_field(saved: Path) -> None:
    params = json.loads((saved / "params.json").read_text())
    del params["n_layers"]
    (saved / "params.json").write_text(json.dumps(params))
    _one_line(saved, "missing required field 'n_layers'")


def test_params_contradict_weights(saved: Path) -> None:
    params = json.loads((saved / "params.json").read_text())
    params["multiple_of"] = 256  # FFN width 256, but the weights have 176
    (saved / "params.json").write_text(json.dumps(params))
    _one_line(saved, r"has shape \[176, 64\] but .* implies \[256, 64\]")


def test_what_meta_cannot_express(tmp_path: Path) -> None:
    with pytest.raises(CamelidError, match="no q/k/v biases"):
        save_meta_dir(Llama(LlamaConfig.from_name("tiny-gqa", qkv_bias=True)), tmp_path)
    with pytest.raises(CamelidError, match="n_kv_heads 1 is not divisible by 2 shards"):
        save_meta_dir(Llama(LlamaConfig.from_name("tiny-mqa")), tmp_path, n_shards=2)
    with pytest.raises(CamelidError, match="original context 8192"):
        save_meta_dir(Llama(LlamaConfig.from_name("tiny-llama3")), tmp_path)


@pytest.mark.parametrize(("change", "match"), [
    ({"dim": "big"}, "dim = 'big' must be an integer"),
    ({"n_layers": 10**6}, "n_layers = 1000000 must be at most 1024"),
    ({"norm_eps": -1.0}, "norm_eps = -1.0 must lie in"),
    ({"ffn_dim_multiplier": float("inf")}, "a size field is out of range"),
    ({"multiple_of": 0}, "multiple_of = 0 must be at least 1"),
])
def test_params_fields_are_checked(saved: Path, change: dict, match: str) -> None:
    params = json.loads((saved / "params.json").read_text())
    params.update(change)
    (saved / "params.json").write_text(json.dumps(params))
    assert str(saved / "params.json") in _one_line(saved, match)


def test_params_json_must_be_an_object(saved: Path) -> None:
    (saved / "params.json").write_text("[4096, 32]")
    _one_line(saved, "params.json: holds a JSON list, not an object")
