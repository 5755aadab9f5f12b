"""Text classification with a head on either family: BERT ([CLS] -> pooler -> linear) or LLaMA (the last
token's final hidden state -> linear), trained fully ("finetune"), with a frozen backbone ("probe") or, for LLaMA,
with LoRA adapters on a frozen backbone ("lora", camelid.variants.lora; the head trains too).

Data is jsonl, one `{"text": ..., "label": ...}` per line; an optional `"split"` field ("train", "dev",
"test") fixes the split, otherwise a seeded stratified 80/20 split is made. A trained classifier is a
folder: for BERT a Hugging Face BertForSequenceClassification (transformers loads it) plus the tokenizer;
for LLaMA the head (and, when fine-tuned, the backbone as a Hugging Face directory). `classifier.json`
beside them says which. Training goes through the training loop: camelid.train.classify.train_classifier.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from camelid.bert.model import BertForClassification
from camelid.errors import CamelidError
from camelid.fileio import atomic_write, atomic_write_text, iter_jsonl
from camelid.model import Llama
from camelid.tokenizer import Tokenizer
from camelid.tokenizer.wordpiece import WordPiece

MODES = ("finetune", "probe", "lora")

# ---------------------------------------------------------------------------------------------------
# data


@dataclass
class Example:
    text: str
    label: str
    split: str | None = None


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read `{"text", "label"[, "split"]}` lines; any bad line is a one-line error naming its number."""
    path = Path(path)
    if not path.is_file():
        raise CamelidError(f"{path}: no such file; pass a jsonl file of {{\"text\", \"label\"}} lines")
    out = []
    for n, d in iter_jsonl(path, "each line must be one JSON object"):
        if not isinstance(d, dict) or not isinstance(d.get("text"), str) or "label" not in d:
            raise CamelidError(f"{path}:{n}: each line needs a string \"text\" and a \"label\"")
        out.append(Example(d["text"], str(d["label"]), d.get("split")))
    if not out:
        raise CamelidError(f"{path}: no examples; the file is empty")
    return out


def train_test_split(examples: Sequence[Example], test_fraction: float = 0.2,
                     seed: int = 0) -> tuple[list[Example], list[Example]]:
    """The file's own `split` field when present (dev counts as test only if there is no test), else a seeded
    stratified split, so every model sees the same examples."""
    if all(e.split for e in examples):
        train = [e for e in examples if e.split == "train"]
        test = [e for e in examples if e.split == "test"] or [e for e in examples if e.split in ("dev", "validation")]
        if train and test:
            return train, test
    by_label: dict[str, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    rng = random.Random(seed)
    train, test = [], []
    for items in by_label.values():
        items = items[:]
        rng.shuffle(items)
        k = max(1, round(len(items) * test_fraction)) if len(items) > 1 else 0
        test += items[:k]
        train += items[k:]
    if not train or not test:
        raise CamelidError("too few examples to split into train and test; give at least two per label")
    return train, test


def dev_split(examples: Sequence[Example]) -> list[Example]:
    """The file's dev examples when it has a test split besides them (otherwise train_test_split tests on dev)."""
    if any(e.split == "test" for e in examples):
        return [e for e in examples if e.split in ("dev", "validation")]
    return []


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (F1 per class, unweighted mean over classes, 0 for a class never predicted nor true)."""
    if not y_true:
        raise CamelidError("no examples to score")
    acc = sum(int(t == p) for t, p in zip(y_true, y_pred, strict=True)) / len(y_true)
    f1s = []
    for c in range(n_labels):
        tp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == c and p != c)
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": acc, "macro_f1": sum(f1s) / n_labels}


# ---------------------------------------------------------------------------------------------------
# the two families behind one interface


class TextClassifier(nn.Module):
    """A backbone that turns a batch of texts into one vector each, and a linear head over those vectors."""

    family: str = ""

    def __init__(self, labels: Sequence[str], dim: int, max_len: int) -> None:
        super().__init__()
        self.labels = list(labels)
        self.max_len = max_len
        self.head = nn.Linear(dim, len(self.labels))

    @property
    def backbone(self) -> nn.Module:
        raise NotImplementedError

    def batch(self, texts: Sequence[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.head(self.dropout(self.features(batch)))

    def device_batch(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """`batch`, on the device the classifier's weights are on."""
        device = self.head.weight.device
        return {k: v.to(device) for k, v in self.batch(texts).items()}

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[int]:
        self.eval()
        out: list[int] = []
        for i in range(0, len(texts), batch_size):
            out += self(self.device_batch(texts[i:i + batch_size])).argmax(-1).tolist()
        return out

    def param_counts(self) -> dict[str, int]:
        params = {id(p): p for p in self.parameters()}.values()  # tied weights once
        return {"total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad)}


class BertClassifier(TextClassifier):
    """BERT: [CLS] -> pooler -> dropout -> linear; the head is `BertForClassification.classifier`."""

    family = "bert"

    def __init__(self, model: BertForClassification, tokenizer: WordPiece, labels: Sequence[str],
                 max_len: int = 128) -> None:
        super().__init__(labels, model.config.dim, max_len)
        if model.num_labels != len(self.labels):
            raise CamelidError(f"the model has {model.num_labels} outputs but {len(self.labels)} labels were given")
        self.model, self.tokenizer = model, tokenizer
        self.head = model.classifier
        self.dropout = model.dropout

    @property
    def backbone(self) -> nn.Module:
        return self.model.bert

    def batch(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return self.tokenizer(list(texts), max_len=self.max_len)

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])[1]


class LlamaClassifier(TextClassifier):
    """LLaMA: the final hidden state of each text's last token (it has read the whole text) -> linear head."""

    family = "llama"

    def __init__(self, model: Llama, tokenizer: Tokenizer, labels: Sequence[str], max_len: int = 256,
                 dropout: float = 0.0) -> None:
        super().__init__(labels, model.config.dim, max_len)
        self.model, self.tokenizer = model, tokenizer
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def backbone(self) -> nn.Module:
        return self.model

    def batch(self, texts: Sequence[str]) -> dict[str, Tensor]:
        seqs = [self.tokenizer.encode(t, add_bos=True)[:self.max_len] or [0] for t in texts]
        T = max(len(s) for s in seqs)
        # right padding: with causal attention no real token ever sees a pad, so no mask is needed
        ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], dtype=torch.long)
        return {"input_ids": ids, "last": torch.tensor([len(s) - 1 for s in seqs])}

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        hidden = self.model.hidden_states(batch["input_ids"])
        return hidden[torch.arange(hidden.shape[0]), batch["last"]]


# ---------------------------------------------------------------------------------------------------
# features, labels and evaluation


def label_ids(clf: TextClassifier, examples: Sequence[Example], what: str = "the data's") -> list[int]:
    """Each example's label as the index of the classifier's output; an unknown label is a one-line error."""
    index = {name: i for i, name in enumerate(clf.labels)}
    unknown = sorted({e.label for e in examples} - set(index))
    if unknown:
        raise CamelidError(f"{what} labels {unknown[:3]} are not among the classifier's labels {clf.labels}")
    return [index[e.label] for e in examples]


@torch.no_grad()
def extract_features(clf: TextClassifier, texts: Sequence[str], batch_size: int = 32,
                     desc: str = "features") -> Tensor:
    clf.eval()
    chunks = []
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, file=sys.stderr, leave=False):
        chunks.append(clf.features(clf.device_batch(texts[i:i + batch_size])).float())
    return torch.cat(chunks)


def evaluate_classifier(clf: TextClassifier, examples: Sequence[Example], batch_size: int = 32) -> dict[str, Any]:
    """Accuracy, macro-F1 and timing: per-example latency (batch of 1) on a sample, and batched throughput."""
    y = label_ids(clf, examples)
    texts = [e.text for e in examples]
    t0 = time.perf_counter()
    pred = clf.predict(texts, batch_size)
    batched = time.perf_counter() - t0
    sample = texts[: min(20, len(texts))]
    t0 = time.perf_counter()
    clf.predict(sample, batch_size=1)
    latency = (time.perf_counter() - t0) / len(sample)
    out = classification_metrics(y, pred, len(clf.labels))
    return {**out, "n": len(texts), "latency_ms": latency * 1000, "throughput_per_s": len(texts) / batched,
            "predictions": [clf.labels[p] for p in pred]}


# ---------------------------------------------------------------------------------------------------
# building, saving and loading


def model_family(source: str | os.PathLike) -> str:
    """'bert' or 'llama' for a model name, a Hugging Face folder, a GGUF file or a trained classifier folder."""
    from camelid import hub

    text = str(source)
    if text in hub.MODELS:
        return "bert" if hub.MODELS[text].kind == "bert" else "llama"
    path = Path(text)
    if (path / "classifier.json").is_file():
        return json.loads((path / "classifier.json").read_text())["family"]
    if path.exists():
        from camelid.formats import Format, detect

        return "bert" if detect(path) is Format.BERT else "llama"
    return "llama"


def load_llm(source: str | os.PathLike) -> tuple[Llama, Tokenizer]:
    """A LLaMA-family model (fp32) and its tokenizer, as camelid.load reads them."""
    from camelid.llm import load

    llm = load(source)
    if llm.tokenizer is None:
        raise CamelidError(f"{source}: no tokenizer found beside the model; a LLaMA classifier needs one")
    return llm.model.float(), llm.tokenizer


def new_classifier(source: str | os.PathLike, labels: Sequence[str], max_len: int | None = None) -> TextClassifier:
    """A classifier with a fresh head on a pretrained backbone (a name, a HF folder or a GGUF file)."""
    from camelid import hub

    if model_family(source) == "bert":
        from camelid.interop.bert_hf import load_bert_hf_dir

        path = hub.resolve(source)
        # the encoder only: a checkpoint's own classifier would belong to other labels
        config, encoder, raw = load_bert_hf_dir(path, task="base")
        model = BertForClassification(config, len(labels), raw.get("classifier_dropout"))
        model.bert = encoder
        return BertClassifier(model, WordPiece.from_dir(path), labels, max_len or 128)
    model, tok = load_llm(source)
    return LlamaClassifier(model, tok, labels, max_len or 256)


def save_classifier(clf: TextClassifier, path: str | os.PathLike, backbone_source: str | None = None,
                    mode: str = "finetune", extra: dict[str, Any] | None = None) -> Path:
    """A folder `load_classifier` reads back. A probed LLaMA keeps only its head and names its backbone."""
    path = Path(path)
    meta: dict[str, Any] = {"family": clf.family, "labels": clf.labels, "max_len": clf.max_len, "mode": mode,
                            **(extra or {})}
    if isinstance(clf, BertClassifier):
        from camelid.interop.bert_hf import save_bert_hf_dir

        save_bert_hf_dir(clf.model, path, labels=clf.labels)
        clf.tokenizer.save(path)
    elif isinstance(clf, LlamaClassifier):
        head = {k: v.detach().contiguous() for k, v in clf.head.state_dict().items()}
        atomic_write(path / "head.safetensors", lambda p: save_file(head, str(p)))
        if mode == "probe" and backbone_source is not None:
            meta["backbone"] = str(backbone_source)
        else:
            from camelid.variants.lora import lora_modules, merge_lora

            if lora_modules(clf.model):  # a LoRA classifier is saved merged: a plain backbone
                merge_lora(clf.model)
            from camelid.interop.hf import save_hf_dir

            save_hf_dir(clf.model, path / "backbone")
            clf.tokenizer.save_pretrained(path / "backbone")
            meta["backbone"] = "backbone"
    else:
        raise CamelidError(f"cannot save a {type(clf).__name__}")
    atomic_write_text(path / "classifier.json", json.dumps(meta, indent=2) + "\n")
    return path


def add_to_classifier_json(path: str | os.PathLike, **sections: Any) -> None:
    """Record more about a saved classifier (e.g. its test scores) in its classifier.json."""
    meta_file = Path(path) / "classifier.json"
    meta = {**json.loads(meta_file.read_text()), **sections}
    atomic_write_text(meta_file, json.dumps(meta, indent=2) + "\n")


def load_classifier(path: str | os.PathLike) -> TextClassifier:
    path = Path(path)
    meta_file = path / "classifier.json"
    if not meta_file.is_file():
        raise CamelidError(f"{path}: no classifier.json; train one with `camelid classify train`")
    meta = json.loads(meta_file.read_text())
    if meta["family"] == "bert":
        from camelid.interop.bert_hf import load_bert_hf_dir

        _, model, _ = load_bert_hf_dir(path, task="classification")
        return BertClassifier(model, WordPiece.from_dir(path), meta["labels"], meta["max_len"]).eval()
    backbone = meta["backbone"]
    source = path / backbone if backbone == "backbone" else backbone
    model, tok = load_llm(source)
    clf = LlamaClassifier(model, tok, meta["labels"], meta["max_len"])
    clf.head.load_state_dict(load_file(str(path / "head.safetensors")))
    return clf.eval()


def label_set(examples: Sequence[Example]) -> list[str]:
    """Labels in a stable order: by frequency, then name."""
    counts = Counter(e.label for e in examples)
    return sorted(counts, key=lambda k: (-counts[k], k))


__all__ = [
    "BertClassifier", "Example", "LlamaClassifier", "TextClassifier", "add_to_classifier_json",
    "classification_metrics", "dev_split", "evaluate_classifier", "extract_features", "label_ids", "label_set",
    "load_classifier", "load_llm", "model_family", "new_classifier", "read_jsonl", "save_classifier",
    "train_test_split",
]
