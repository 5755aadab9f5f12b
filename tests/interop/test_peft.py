"""peft's adapter format both ways: what camelid writes, peft loads onto transformers' model of the same base
(logits to 1e-4); what peft writes (per-layer ranks, rslora, a subset of layers and projections), camelid loads;
and an adapter that does not fit is a one-line error naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import camelid
from camelid import Llama, LlamaConfig
from camelid.errors import CamelidError
from camelid.interop.hf import save_hf_dir
from camelid.interop.peft import read_peft_adapter
from camelid.variants.lora import apply_lora, load_adapter, lora_modules, lora_spec, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_hf_dir(Llama(LlamaConfig.from_name("tiny-gqa", tie_embeddings=False)), tmp_path / "base")


def _randomize(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_(0, 0.1)


def test_our_adapter_loads_in_peft_with_the_same_logits(base_dir: Path, tmp_path: Path) -> None:
    ours = camelid.load(base_dir, tokenizer=False).model
    apply_lora(ours, rank=4, alpha=8, targets=["wq", "wk", "wv", "wo", "w1", "w3", "w2"])
    _randomize(ours)
    save_adapter(ours, tmp_path / "adapter", base=str(base_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(base_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
    assert diff < 1e-4
    # peft's own merge gives the same model as camelid's merge
    merged_theirs = theirs.merge_and_unload()
    merged_ours = camelid.load(base_dir, tokenizer=False, adapter=tmp_path / "adapter").model
    with torch.no_grad():
        assert (merged_ours(x) - merged_theirs(x).logits).abs().max().item() < 1e-4


def test_a_peft_made_adapter_loads_into_camelid(base_dir: Path, tmp_path: Path) -> None:
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             rank_pattern={"v_proj": 2}, layers_to_transform=[1], task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "made-by-peft")
    theirs.eval()
    x = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        want = theirs(x).logits
    for merge in (False, True):
        llm = camelid.load(base_dir, tokenizer=False, adapter=tmp_path / "made-by-peft", merge_adapter=merge)
        with torch.no_grad():
            assert (llm.model(x) - want).abs().max().item() < 1e-4, f"merge={merge}"
    unmerged = camelid.load(base_dir, tokenizer=False, adapter=tmp_path / "made-by-peft", merge_adapter=False).model
    mods = lora_modules(unmerged)
    assert sorted(mods) == ["layers.1.attention.wq", "layers.1.attention.wv", "layers.1.feed_forward.w2"]
    assert mods["layers.1.attention.wv"].rank == 2 and mods["layers.1.attention.wq"].rank == 4
    assert lora_spec(unmerged).rslora


def test_a_quantised_base_keeps_its_adapter_unmerged(base_dir: Path, tmp_path: Path) -> None:
    ours = camelid.load(base_dir, tokenizer=False).model
    apply_lora(ours, rank=4)
    _randomize(ours)
    save_adapter(ours, tmp_path / "adapter")
    llm = camelid.load(base_dir, tokenizer=False, adapter=tmp_path / "adapter", merge_adapter=False, quantize="int8")
    x = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        assert (llm.model(x) - ours(x)).abs().max().item() < 0.05  # int8 base: close, not equal
        assert type(next(iter(lora_modules(llm.model).values())).base).__name__ == "Int8Linear"


def test_an_adapter_for_another_base_is_a_one_line_error(base_dir: Path, tmp_path: Path) -> None:
    other = Llama(LlamaConfig.from_name("tiny-gqa", dim=96, n_heads=4, n_kv_heads=2, tie_embeddings=False))
    apply_lora(other, rank=2)
    save_adapter(other, tmp_path / "wide")
    with pytest.raises(CamelidError, match=r"adapter_model\.safetensors: layers\.0\.attention\.wq\.lora_a has shape "
                                           r"\[2, 96\].*trained on another base model"):
        camelid.load(base_dir, tokenizer=False, adapter=tmp_path / "wide")
    deep = Llama(LlamaConfig.from_name("tiny-gqa", n_layers=3))
    apply_lora(deep, rank=2)
    save_adapter(deep, tmp_path / "deep")
    with pytest.raises(CamelidError, match=r"layers\.2\.attention\.w\w, which this 2-layer model does not have"):
        load_adapter(camelid.load(base_dir, tokenizer=False).model, tmp_path / "deep")


def test_unsupported_or_damaged_adapters_are_one_line_errors(base_dir: Path, tmp_path: Path) -> None:
    model = camelid.load(base_dir, tokenizer=False).model
    apply_lora(model, rank=2)
    good = save_adapter(model, tmp_path / "good")
    with pytest.raises(CamelidError, match="no adapter_config.json"):
        read_peft_adapter(tmp_path)
    for key, value, words in [("use_dora", True, "DoRA"), ("modules_to_save", ["lm_head"], "extra modules"),
                              ("peft_type", "IA3", "LoRA adapters only"), ("bias", "all", "biases")]:
        bad = tmp_path / f"bad-{key}"
        bad.mkdir()
        config = json.loads((good / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
        with pytest.raises(CamelidError, match=f"adapter_config.json: {key} = .*{words}"):
            read_peft_adapter(bad)
    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "q_proj.lora_B" not in k}, half / "adapter_model.safetensors")
    with pytest.raises(CamelidError, match="only one of lora_A / lora_B"):
        read_peft_adapter(half)
    (half / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CamelidError, match="corrupt or truncated"):
        read_peft_adapter(half)
    head = tmp_path / "head"
    head.mkdir()
    (head / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.lm_head.lora_B.weight": torch.zeros(320, 2)}, head / "adapter_model.safetensors")
    with pytest.raises(CamelidError, match="adapts lm_head, which is not a linear layer of a LLaMA block"):
        read_peft_adapter(head)
