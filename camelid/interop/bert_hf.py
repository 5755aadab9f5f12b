"""Hugging Face BERT interop: config.json <-> BertConfig, HF BERT weight names <-> camelid's, directories in and out.

The only module that knows Hugging Face's BERT names. Reads BertModel, BertForPreTraining and
BertForSequenceClassification checkpoints (with or without the ``bert.`` prefix, old ``gamma``/``beta``
LayerNorm names too) and writes directories that transformers loads with the matching class.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from camelid.bert.model import Bert, BertConfig, BertForClassification, BertForPreTraining
from camelid.errors import CamelidError
from camelid.fileio import atomic_write, atomic_write_text
from camelid.interop.hf import iter_tensors, read_config, weight_files

_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
TASKS = ("base", "pretraining", "classification")
_ARCH_TASK = {"BertModel": "base", "BertForPreTraining": "pretraining",
              "BertForSequenceClassification": "classification"}
_TASK_ARCH = {v: k for k, v in _ARCH_TASK.items()}

# ---------------------------------------------------------------------------------------------------
# config.json


def bert_config_from_hf(d: dict[str, Any], source: str = "config.json") -> BertConfig:
    """Map a Hugging Face BERT config.json dict to a BertConfig, or say what is wrong."""
    if d.get("model_type", "bert") != "bert":
        raise CamelidError(f"{source}: model_type {d.get('model_type')!r} is not BERT; camelid.Bert loads model_type "
                           "'bert' (LLaMA-family directories load with camelid.load)")
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise CamelidError(f"{source}: position_embedding_type {d['position_embedding_type']!r} is not supported; "
                           "camelid.Bert uses absolute positions")
    act = d.get("hidden_act", "gelu")
    if act not in _ACT_FROM_HF:
        raise CamelidError(f"{source}: hidden_act {act!r} is not supported; use one of {', '.join(_ACT_FROM_HF)}")

    def need(key: str) -> Any:
        if d.get(key) is None:
            raise CamelidError(f"{source}: missing required field {key!r}; add it to the config")
        return d[key]

    try:
        return BertConfig(
            name=d.get("_name_or_path") or "custom",
            vocab_size=int(need("vocab_size")),
            dim=int(need("hidden_size")),
            n_layers=int(need("num_hidden_layers")),
            n_heads=int(need("num_attention_heads")),
            intermediate_size=int(need("intermediate_size")),
            max_seq_len=int(d.get("max_position_embeddings", 512)),
            type_vocab_size=int(d.get("type_vocab_size", 2)),
            norm_eps=float(d.get("layer_norm_eps", 1e-12)),
            hidden_act=_ACT_FROM_HF[act],
            dropout=float(d.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(d.get("attention_probs_dropout_prob", 0.1)),
            pad_token_id=int(d.get("pad_token_id") or 0),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )
    except CamelidError as e:
        raise CamelidError(f"{source}: {e}") from None


def bert_config_to_hf(cfg: BertConfig, task: str = "base", labels: list[str] | None = None,
                      torch_dtype: str = "float32") -> dict[str, Any]:
    """BertConfig -> a config.json dict that transformers' BertModel / BertForPreTraining / ...Classification loads."""
    d: dict[str, Any] = {
        "architectures": [_TASK_ARCH[task]],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": _ACT_TO_HF[cfg.hidden_act],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "torch_dtype": torch_dtype,
    }
    if labels is not None:
        d["id2label"] = {str(i): name for i, name in enumerate(labels)}
        d["label2id"] = {name: i for i, name in enumerate(labels)}
    return d


def labels_from_hf(d: dict[str, Any]) -> list[str] | None:
    id2label = d.get("id2label")
    if not id2label:
        return None
    return [id2label[k] for k in sorted(id2label, key=int)]


# ---------------------------------------------------------------------------------------------------
# weight names: HF (relative to BertModel) <-> camelid (relative to camelid.Bert)

_TOP = {
    "embeddings.word_embeddings": "embeddings.tok_embeddings",
    "embeddings.position_embeddings": "embeddings.pos_embeddings",
    "embeddings.token_type_embeddings": "embeddings.type_embeddings",
    "embeddings.LayerNorm": "embeddings.norm",
    "pooler.dense": "pooler.dense",
}
_LAYER = {
    "attention.self.query": "attention.wq",
    "attention.self.key": "attention.wk",
    "attention.self.value": "attention.wv",
    "attention.output.dense": "attention.wo",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "feed_forward.w1",
    "output.dense": "feed_forward.w2",
    "output.LayerNorm": "ffn_norm",
}
# heads: full HF names (outside BertModel) -> camelid names (outside camelid.Bert)
_HEADS = {
    "cls.predictions.transform.dense": "mlm.dense",
    "cls.predictions.transform.LayerNorm": "mlm.norm",
    "cls.seq_relationship": "nsp",
    "classifier": "classifier",
}
_HF_LAYER_RE = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_CAMELID_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")
# not kept: a buffer, and the decoder tied to the word embeddings (its bias is cls.predictions.bias)
_SKIP = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def hf_to_camelid_name(name: str) -> str | None:
    """Full HF name -> name in our task model (Bert tensors get the 'bert.' prefix); None for skipped tensors."""
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if name.endswith(_SKIP):
        return None
    if name == "cls.predictions.bias":
        return "mlm.bias"
    stem, _, kind = name.rpartition(".")
    if stem in _HEADS:
        return f"{_HEADS[stem]}.{kind}"
    rel = name.removeprefix("bert.")
    stem, _, kind = rel.rpartition(".")
    if stem in _TOP:
        return f"bert.{_TOP[stem]}.{kind}"
    m = _HF_LAYER_RE.match(rel)
    if m and m.group(2) in _LAYER:
        return f"bert.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return name  # unknown: reported as unexpected


_REV_TOP = {v: k for k, v in _TOP.items()}
_REV_LAYER = {v: k for k, v in _LAYER.items()}
_REV_HEADS = {v: k for k, v in _HEADS.items()}


def camelid_to_hf_name(name: str, prefix: str = "bert.") -> str:
    """Name in our task model -> HF name. `prefix` is '' for a bare BertModel checkpoint."""
    if name == "mlm.bias":
        return "cls.predictions.bias"
    stem, _, kind = name.rpartition(".")
    if stem in _REV_HEADS:
        return f"{_REV_HEADS[stem]}.{kind}"
    rel = name.removeprefix("bert.")
    stem, _, kind = rel.rpartition(".")
    if stem in _REV_TOP:
        return f"{prefix}{_REV_TOP[stem]}.{kind}"
    m = _CAMELID_LAYER_RE.match(rel)
    if not m or m.group(2) not in _REV_LAYER:
        raise KeyError(name)
    return f"{prefix}encoder.layer.{m.group(1)}.{_REV_LAYER[m.group(2)]}.{m.group(3)}"


# ---------------------------------------------------------------------------------------------------
# directories


def _wrap(model: nn.Module) -> nn.Module:
    """A bare Bert is addressed as 'bert.*' like the encoder inside the task models."""
    if isinstance(model, Bert):
        holder = nn.Module()
        holder.bert = model
        return holder
    return model


def load_bert_hf_dir(path: str | os.PathLike, task: str = "auto", num_labels: int | None = None,
                     dtype: torch.dtype | None = None) -> tuple[BertConfig, nn.Module, dict[str, Any]]:
    """Load a HF BERT directory as `Bert` (task 'base'), `BertForPreTraining` or `BertForClassification`.

    task 'auto' follows config.json's architecture. Asking for 'classification' from a checkpoint without a
    classifier (e.g. a BertModel) starts a fresh head of `num_labels` outputs, the usual way to fine-tune.
    Returns (config, model in eval mode, the raw config.json dict).
    """
    path = Path(path)
    raw = read_config(path)
    source = str(path / "config.json")
    config = bert_config_from_hf(raw, source)
    if not raw.get("_name_or_path"):
        config.name = path.name
    if task == "auto":
        arch = (raw.get("architectures") or ["BertModel"])[0]
        if arch not in _ARCH_TASK:
            raise CamelidError(f"{source}: architecture {arch!r} is not supported; camelid loads "
                               f"{', '.join(_ARCH_TASK)} (pass task='base' to load only the encoder)")
        task = _ARCH_TASK[arch]
    if task not in TASKS:
        raise CamelidError(f"unknown BERT task {task!r}; use one of auto, {', '.join(TASKS)}")

    if task == "classification":
        labels = labels_from_hf(raw)
        n = num_labels or (len(labels) if labels else None)
        if n is None:
            raise CamelidError(f"{source}: no id2label in config.json; pass num_labels for the classification head")
        model: nn.Module = BertForClassification(config, n, raw.get("classifier_dropout"))
    elif task == "pretraining":
        model = BertForPreTraining(config)
    else:
        model = Bert(config)
    target = _wrap(model)
    expected = target.state_dict()
    state: dict[str, Tensor] = {}
    files = weight_files(path)
    for file in files:
        for hf_name, t in iter_tensors(file):
            name = hf_to_camelid_name(hf_name)
            if name is None:
                continue
            if name not in expected:
                if name.startswith(("mlm.", "nsp.", "classifier.")):
                    continue  # a head this task does not use (e.g. loading BertForPreTraining as 'base')
                raise CamelidError(f"{files[0]}: unexpected tensor {hf_name!r}; it does not belong to a "
                                   f"{config.n_layers}-layer BERT (is config.json for another model?)")
            if tuple(t.shape) != tuple(expected[name].shape):
                raise CamelidError(f"{files[0]}: tensor {hf_name!r} has shape {list(t.shape)} but config.json "
                                   f"implies {list(expected[name].shape)}; the weights and config do not match")
            state[name] = t.to(dtype or torch.float32)
    # a fresh classifier is expected when fine-tuning starts from an encoder; a pooler may be absent from
    # encoder-only exports (HF then initialises it at random too)
    optional = ("classifier.", "bert.pooler.") if task == "classification" else ("bert.pooler.",)
    missing = [k for k in expected if k not in state and k != "mlm.decoder.weight" and not k.startswith(optional)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        names = ", ".join(camelid_to_hf_name(k) for k in missing[:3])
        raise CamelidError(f"{path}: missing tensor(s) {names}{more}; the checkpoint is incomplete or is not a "
                           f"{_TASK_ARCH[task]}")
    target.load_state_dict(state, strict=False)
    if isinstance(model, BertForPreTraining):
        model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    return config, model.eval(), raw


def bert_hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    prefix = "" if isinstance(model, Bert) else "bert."
    out = {}
    for name, t in _wrap(model).state_dict().items():
        if name == "mlm.decoder.weight":
            continue  # tied to the word embeddings; transformers re-ties it on load
        out[camelid_to_hf_name(name, prefix)] = t.detach().contiguous()
    return out


def save_bert_hf_dir(model: nn.Module, path: str | os.PathLike, labels: list[str] | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Write config.json + model.safetensors (atomically) for the HF class matching `model`."""
    path = Path(path)
    if isinstance(model, BertForClassification):
        task = "classification"
        labels = labels or [f"LABEL_{i}" for i in range(model.num_labels)]
    elif isinstance(model, BertForPreTraining):
        task, labels = "pretraining", None
    elif isinstance(model, Bert):
        task, labels = "base", None
    else:
        raise CamelidError(f"cannot save a {type(model).__name__} as a Hugging Face BERT directory")
    tensors = bert_hf_state_dict(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    atomic_write(path / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    cfg = bert_config_to_hf(model.config, task, labels, torch_dtype=dtype_name)
    atomic_write_text(path / "config.json", json.dumps(cfg, indent=2) + "\n")
    return path
