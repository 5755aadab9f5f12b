"""What the training loop trains: the pieces of a run that depend on the model and its data.

    clm        next-token prediction for a LLaMA, on token shards from `camelid prepare`
    mlm+nsp    BERT's masked-LM (15%, 80/10/10) + next-sentence prediction (50% random), on sentence pairs from
               `camelid prepare --objective mlm+nsp`
    classify   a text classifier (BERT or LLaMA backbone + linear head) on labelled examples, the whole model
               or only its head over frozen features (camelid.train.classify builds it from the examples)

Each is an `Objective`: it builds the model, draws micro-batch `index` of step `step` from (seed, step, index)
alone (so exact resume and "2 processes = 1 process accumulating 2 micro-batches" hold for all), computes the
loss, evaluates on held-out data, and exports the trained model. The loop (camelid/train/loop.py) does
everything else the same way for all of them; a new objective (SFT, LoRA, DPO, distillation) is one more class
here, handed to `train(cfg, objective=...)` or registered by name in KINDS.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.errors import CamelidError
from camelid.train import distributed as D
from camelid.train.config import OBJECTIVES, TrainConfig

if TYPE_CHECKING:
    from camelid.classify import Example, TextClassifier

Batch = Any  # whatever an objective's batch() returns and its loss() reads


class Objective(Protocol):
    """What the loop needs from an objective. Attributes: `name` (the model, for the plot's title),
    `log_fields` (the validation metrics evaluate() returns, as log.csv columns; val_loss first), `plot_metric`
    ((log field, axis label) drawn beside the loss), `references` (dashed lines on that panel, e.g. a baseline)."""

    name: str
    log_fields: list[str]
    plot_metric: tuple[str, str]
    references: dict[str, float]

    def build_model(self) -> nn.Module:
        """The module to train (its parameters that require grad are optimised). Called once, after
        torch.manual_seed(cfg.seed), so a fresh initialisation is the same on every process."""
        ...

    def blocks(self, model: nn.Module) -> nn.ModuleList | None:
        """The repeated blocks: recomputed in backward (activation_checkpointing), sharded one by one (FSDP)."""
        ...

    def flops_per_token(self) -> float:
        """Training FLOPs per token slot (batch_size x block_size per micro-batch): the MFU numerator."""
        ...

    def batch(self, step: int, index: int) -> Batch:
        """Micro-batch `index` (counted across processes: 0 .. grad_accum x world_size - 1) of optimizer step
        `step`, drawn from (cfg.seed, step, index) alone, on the device."""
        ...

    def loss(self, forward: nn.Module, batch: Batch) -> Tensor:
        """The scalar loss of one micro-batch; `forward` is the model as the loop calls it (DDP, compiled)."""
        ...

    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        """Validation metrics (log_fields at least; more go to TrainResult.val_metrics only). `full`: all of the
        validation data (the last evaluation), else its first cfg.eval_tokens."""
        ...

    def describe(self, metrics: dict[str, float]) -> str:
        """The validation metrics in words, for the log."""
        ...

    def intro(self) -> str:
        """A line printed before training (e.g. a baseline's score; it may set `references`), or ''."""
        ...

    def sampler(self) -> Callable[[nn.Module, int], str] | None:
        """(model, step) -> text printed every sample_interval steps, or None."""
        ...

    def export(self, model: nn.Module, state: dict[str, Tensor]) -> Path:
        """Write the trained model where users load it from (cfg.export_path) and return that path. `state` holds
        the final weights (gathered from every process under FSDP)."""
        ...


ObjectiveFactory = Callable[[TrainConfig, torch.device], Objective]


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    name = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, name))


# ---------------------------------------------------------------------------------------------------
# clm: LLaMA next-token prediction


class CausalLM:
    """Next-token prediction on random windows of the token shards; validation loss and bits per byte."""

    log_fields = ["val_loss", "val_bpb"]
    plot_metric = ("val_bpb", "bits per byte")
    references: dict[str, float] = {}

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        from camelid.train.data import TokenShards

        self.cfg, self.device = cfg, device
        self.data = data = TokenShards(cfg.data)
        mcfg = cfg.llama_config(vocab_size=data.vocab_size)
        if mcfg.vocab_size < data.vocab_size:
            raise CamelidError(f"model vocab_size {mcfg.vocab_size} is smaller than the tokenizer's "
                               f"{data.vocab_size}; raise model.vocab_size or leave it out to use the tokenizer's")
        if cfg.block_size > mcfg.max_seq_len:
            raise CamelidError(f"block_size {cfg.block_size} exceeds the model's max_seq_len {mcfg.max_seq_len}")
        if mcfg.bos_token_id != data.meta["eos_id"] and "bos_token_id" not in (cfg.model if isinstance(cfg.model, dict)
                                                                                else {}):
            mcfg = mcfg.replace(bos_token_id=data.meta["eos_id"], eos_token_id=data.meta["eos_id"])
        self.model_config = mcfg
        self.name = mcfg.name

    def build_model(self) -> nn.Module:
        from camelid.variants.training import TrainLlama

        return TrainLlama(self.model_config)  # Llama's parameters and function, computed faster for training

    @staticmethod
    def blocks(model: nn.Module) -> nn.ModuleList:
        return model.layers

    def flops_per_token(self) -> float:
        from camelid.train.flops import flops_per_token

        return flops_per_token(self.model_config, self.cfg.block_size)

    def batch(self, step: int, index: int) -> Batch:
        cfg = self.cfg
        x, y = self.data.batch(cfg.seed, step, index, cfg.batch_size, cfg.block_size)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    @staticmethod
    def loss(forward: nn.Module, batch: Batch) -> Tensor:
        """Mean cross-entropy of fp32 logits; TrainLlama computes the head and the loss together."""
        x, y = batch
        return forward(x, targets=y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        """val_loss (nats/token) and val_bpb (bits per byte) over the validation split (its first eval_tokens
        unless `full`).

        Bits per byte = summed NLL / ln 2 / UTF-8 bytes, where the bytes are the share of the held-out text
        that the scored tokens cover (all of it when eval_tokens is 0)."""
        cfg, device, data = self.cfg, self.device, self.data
        was_training = model.training
        model.eval()
        nll, count = torch.zeros((), dtype=torch.float64), 0
        for x, y in data.val_windows(cfg.block_size, 0 if full else cfg.eval_tokens):
            with autocast(cfg, device):
                logits = model(x.to(device))
            nll += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").double().cpu()
            count += y.numel()
        model.train(was_training)
        if count == 0:
            return {"val_loss": float("nan"), "val_bpb": float("nan")}
        predictable = max(1, data.meta["val_tokens"] - 1)
        nbytes = data.meta["val_bytes"] * count / predictable
        return {"val_loss": float(nll / count), "val_bpb": float(nll / math.log(2) / nbytes)}

    @staticmethod
    def describe(metrics: dict[str, float]) -> str:
        return f"val loss {metrics['val_loss']:.4f}, val {metrics['val_bpb']:.4f} bits/byte"

    def intro(self) -> str:
        return ""

    def sampler(self) -> Callable[[nn.Module, int], str]:
        """A sample generation from the prompt, for the log and out/samples.txt."""
        from camelid.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(self.cfg.tokenizer or self.data.dir / "tokenizer.json")
        return lambda model, step: sample_text(model, tokenizer, self.data.meta["eos_id"], self.cfg, step)

    def export(self, model: nn.Module, state: dict[str, Tensor]) -> Path:
        """The final weights as a Hugging Face LlamaForCausalLM folder, with the tokenizer beside them."""
        from camelid.interop.hf import save_hf_dir
        from camelid.variants.training import to_reference

        out = self.cfg.export_path
        save_hf_dir(to_reference(model, state), out)
        tok = Path(self.cfg.tokenizer) if self.cfg.tokenizer else self.data.dir / "tokenizer.json"
        if tok.is_dir():
            tok = tok / "tokenizer.json"
        shutil.copyfile(tok, out / "tokenizer.json")
        if (tok.parent / "tokenizer_config.json").is_file():
            shutil.copyfile(tok.parent / "tokenizer_config.json", out / "tokenizer_config.json")
        return out


def sample_text(model: nn.Module, tokenizer: Any, eos: int, cfg: TrainConfig, step: int) -> str:
    from camelid.generate import SamplingParams, generate

    prompt = tokenizer.encode(cfg.sample_prompt) if cfg.sample_prompt else []
    prompt = [eos, *prompt]
    n = max(1, min(cfg.sample_tokens, model.config.max_seq_len - len(prompt)))
    params = SamplingParams(temperature=0.8, top_k=50)
    ids = generate(model, prompt, n, params, stop_ids=[eos], seed=cfg.seed + step)
    return cfg.sample_prompt + tokenizer.decode([i for i in ids if i != eos])


# ---------------------------------------------------------------------------------------------------
# mlm+nsp: BERT pre-training


class MaskedLM:
    """BERT pre-training on sentence pairs: loss = mean MLM cross-entropy at the masked positions + mean NSP
    cross-entropy (what transformers' BertForPreTraining computes). block_size is the length of a pair,
    [CLS] A [SEP] B [SEP], longest-first truncated; a micro-batch is padded to its longest pair."""

    log_fields = ["val_loss", "val_mlm_loss", "val_mlm_acc", "val_nsp_acc"]
    plot_metric = ("val_mlm_acc", "MLM accuracy")

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        from camelid.bert.data import load_pairs

        if cfg.distributed == "fsdp":
            raise CamelidError("objective mlm+nsp trains under torchrun with distributed=ddp, not fsdp")
        self.cfg, self.device = cfg, device
        self.train_data, self.val_data = load_pairs(cfg.data, cfg.block_size, cfg.seed)
        self.tokenizer = tok = self.train_data.tokenizer
        self.model_config = cfg.bert_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id)
        if self.model_config.vocab_size < tok.vocab_size:
            raise CamelidError(f"model vocab_size {self.model_config.vocab_size} is smaller than the WordPiece "
                               f"vocabulary's {tok.vocab_size}; leave model.vocab_size out to use the vocabulary's")
        if cfg.block_size > self.model_config.max_seq_len:
            raise CamelidError(f"block_size {cfg.block_size} exceeds the model's max_seq_len "
                               f"{self.model_config.max_seq_len}")
        self.name = self.model_config.name
        self.references: dict[str, float] = {}  # the unigram baseline's accuracy, once intro() has scored it
        self._unigram = None

    def build_model(self) -> nn.Module:
        from camelid.bert.model import BertForPreTraining

        return BertForPreTraining(self.model_config)

    @staticmethod
    def blocks(model: nn.Module) -> nn.ModuleList:
        return model.bert.layers

    def flops_per_token(self) -> float:
        """6 per weight of the encoder's matmuls, the MLM head at the 15% masked positions, and attention."""
        c, T = self.model_config, self.cfg.block_size
        encoder = c.n_layers * (4 * c.dim * c.dim + 2 * c.dim * c.intermediate_size)
        head = self.train_data.mask_prob * (c.dim * c.dim + c.dim * c.vocab_size)
        return 6.0 * (encoder + head) + 12.0 * c.n_layers * c.dim * T

    def batch(self, step: int, index: int) -> Batch:
        b = self.train_data.batch_at(self.cfg.seed, step, index, self.cfg.batch_size)
        return {k: v.to(self.device, non_blocking=True) for k, v in b.items()}

    @staticmethod
    def loss(forward: nn.Module, batch: Batch) -> Tensor:
        from camelid.bert.model import IGNORE, pretraining_loss

        chosen = batch["mlm_labels"] != IGNORE
        mlm_logits, nsp_logits = forward(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                         masked=chosen)
        return pretraining_loss(mlm_logits, nsp_logits, batch["mlm_labels"][chosen], batch["nsp_labels"])

    def _scores(self, model: nn.Module, full: bool) -> dict[str, float]:
        from camelid.bert.data import score, unigram_counts

        if self._unigram is None:
            self._unigram = unigram_counts(self.train_data.documents, self.tokenizer)
        cfg = self.cfg
        max_pairs = 0 if full or not cfg.eval_tokens else max(1, cfg.eval_tokens // cfg.block_size)
        batches = self.val_data.heldout_batches(cfg.seed, cfg.batch_size, max_pairs)
        with autocast(cfg, self.device):
            return score(model, batches, self._unigram, self.tokenizer.vocab_size, self.device)

    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        """On held-out pairs (each held-out sentence once as A; the first eval_tokens / block_size pairs unless
        `full`): val_loss (MLM + NSP, as the training loss), MLM loss and accuracy, NSP accuracy; and beside them
        the NSP loss and the unigram baselines on the same masked positions."""
        s = self._scores(model, full)
        return {"val_loss": s["mlm_loss"] + s["nsp_loss"], "val_mlm_loss": s["mlm_loss"],
                "val_mlm_acc": s["mlm_accuracy"], "val_nsp_acc": s["nsp_accuracy"], "val_nsp_loss": s["nsp_loss"],
                "val_unigram_acc": s["unigram_top1_accuracy"], "val_unigram_loss": s["unigram_loss"],
                "val_masked_tokens": s["masked_tokens"]}

    @staticmethod
    def describe(metrics: dict[str, float]) -> str:
        return (f"val loss {metrics['val_loss']:.4f}, MLM loss {metrics['val_mlm_loss']:.4f}, "
                f"MLM accuracy {metrics['val_mlm_acc']:.3f}, NSP accuracy {metrics['val_nsp_acc']:.3f}")

    def intro(self) -> str:
        """The unigram baselines on the held-out masked positions (model-free: scored with a constant model)."""
        s = self._scores(_Constant(self.tokenizer.vocab_size), full=True)
        self.references = {"unigram baseline": s["unigram_top1_accuracy"]}
        return (f"held-out baseline (unigram): MLM accuracy {s['unigram_top1_accuracy']:.3f}, "
                f"MLM loss {s['unigram_loss']:.4f}; NSP by chance 0.5; {s['masked_tokens']} masked tokens")

    def sampler(self) -> None:
        return None  # nothing to generate

    def export(self, model: nn.Module, state: dict[str, Tensor]) -> Path:
        """The final weights as a Hugging Face BertForPreTraining folder, with the WordPiece vocabulary."""
        from camelid.bert.model import BertForPreTraining
        from camelid.interop.bert_hf import save_bert_hf_dir

        out = self.cfg.export_path
        with torch.device("meta"):
            plain = BertForPreTraining(model.config)
        plain.load_state_dict(state, assign=True, strict=False)
        plain.tie_weights()
        save_bert_hf_dir(plain, out)
        self.tokenizer.save(out)
        return out


class _Constant(nn.Module):
    """Zero logits for every position: lets `score` report the unigram baselines without a model."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor,
                masked: Tensor) -> tuple[Tensor, Tensor]:
        return input_ids.new_zeros(int(masked.sum()), self.vocab_size, dtype=torch.float), \
            input_ids.new_zeros(len(input_ids), 2, dtype=torch.float)


# ---------------------------------------------------------------------------------------------------
# classify: a text classifier's fine-tuning (or linear probe)


class Classification:
    """Cross-entropy of a text classifier's logits (camelid.classify: BERT [CLS] or LLaMA last token -> linear
    head) on labelled examples. mode "finetune" trains the whole classifier; "probe" freezes the backbone,
    computes its features once, and trains the head (with its dropout) on them; "lora" trains the head and LoRA
    adapters over a frozen LLaMA backbone (`lora`'s spec, unless the backbone has adapters already).

    The examples form an endless stream of epochs, each a permutation drawn from (seed, epoch); micro-batch g
    of step s is the stream's batch_size examples from position (s x micro-batches per step + g) x batch_size.
    So every example is seen once per epoch, and batches depend on (seed, step, index) alone. Validation: loss
    and accuracy on the dev examples, with the majority class's accuracy as the reference line."""

    log_fields = ["val_loss", "val_acc"]
    plot_metric = ("val_acc", "dev accuracy")

    def __init__(self, cfg: TrainConfig, device: torch.device, *, classifier: TextClassifier,
                 train: Sequence[Example], dev: Sequence[Example] = (), mode: str = "finetune",
                 backbone_source: str | None = None, lora: Any = None) -> None:
        from camelid.classify import MODES, extract_features, label_ids

        if mode not in MODES:
            raise CamelidError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        if cfg.distributed == "fsdp":
            raise CamelidError("a classifier trains under torchrun with distributed=ddp, not fsdp")
        if not train:
            raise CamelidError("no training examples; the data's train split is empty")
        self.cfg, self.device, self.mode = cfg, device, mode
        self.classifier, self.backbone_source = classifier.to(device), backbone_source
        self.name = f"{classifier.family} classifier ({mode})"
        self.texts = [e.text for e in train]
        self.labels = torch.tensor(label_ids(classifier, train, "training"))
        self.dev_texts = [e.text for e in dev]
        self.dev_labels = torch.tensor(label_ids(classifier, dev, "dev"), dtype=torch.long)
        if mode == "lora":
            from camelid.model import Llama
            from camelid.variants.lora import LoraSpec, apply_lora, lora_modules

            if not isinstance(classifier.backbone, Llama):
                raise CamelidError(f"mode lora adapts a LLaMA backbone, not a {classifier.family} one; use finetune "
                                   "or probe")
            if not lora_modules(classifier.backbone):  # apply_lora freezes all but the adapters
                apply_lora(classifier.backbone, lora or LoraSpec())
        else:
            classifier.backbone.requires_grad_(mode == "finetune")
        self.param_counts = classifier.param_counts()  # as trained (an export may merge LoRA adapters away)
        self.features = self.dev_features = None
        if mode == "probe":  # the backbone is frozen: its features never change, so compute them once
            self.features = extract_features(classifier, self.texts, desc="probe: backbone features")
            if dev:
                self.dev_features = extract_features(classifier, self.dev_texts, desc="probe: dev features")
        self.references: dict[str, float] = {}
        self._orders: dict[int, np.ndarray] = {}

    def build_model(self) -> nn.Module:
        clf = self.classifier
        return nn.Sequential(clf.dropout, clf.head) if self.mode == "probe" else clf

    def blocks(self, model: nn.Module) -> nn.ModuleList | None:
        if self.mode == "probe":
            return None
        backbone = self.classifier.backbone
        return backbone.layers

    def flops_per_token(self) -> float:
        """6 per weight of the backbone's matmuls and attention per token; the head once per text."""
        clf, T = self.classifier, self.cfg.block_size
        head = 6.0 * clf.head.weight.numel() / T
        if self.mode == "probe":
            return head
        layers = self.classifier.backbone.layers
        matmuls = sum(p.numel() for p in layers.parameters() if p.dim() == 2)
        per_weight = 4.0 if self.mode == "lora" else 6.0  # a frozen weight: forward and the input's gradient
        return per_weight * matmuls + 12.0 * len(layers) * clf.head.in_features * T + head

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.texts))
        return self._orders[epoch]

    def indices(self, step: int, index: int) -> list[int]:
        """The training examples of micro-batch `index` of step `step`."""
        cfg, n = self.cfg, len(self.texts)
        first = (step * cfg.grad_accum * D.world_size() + index) * cfg.batch_size
        return [int(self._order(p // n)[p % n]) for p in range(first, first + cfg.batch_size)]

    def batch(self, step: int, index: int) -> Batch:
        idx = self.indices(step, index)
        return self._inputs(idx, self.texts, self.features), self.labels[idx].to(self.device)

    def _inputs(self, idx: list[int], texts: list[str], features: Tensor | None) -> Any:
        if features is not None:
            return features[idx].to(self.device)
        return {k: v.to(self.device) for k, v in self.classifier.batch([texts[i] for i in idx]).items()}

    @staticmethod
    def loss(forward: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(forward(x).float(), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        """val_loss (mean cross-entropy) and val_acc on the dev examples (all of them: a dev set is small)."""
        n = len(self.dev_texts)
        if n == 0:
            return {"val_loss": float("nan"), "val_acc": float("nan")}
        was_training = model.training
        model.eval()
        loss_sum, correct = 0.0, 0
        for i in range(0, n, 32):
            idx = list(range(i, min(n, i + 32)))
            with autocast(self.cfg, self.device):
                logits = model(self._inputs(idx, self.dev_texts, self.dev_features)).float()
            y = self.dev_labels[idx].to(self.device)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        model.train(was_training)
        return {"val_loss": loss_sum / n, "val_acc": correct / n}

    @staticmethod
    def describe(metrics: dict[str, float]) -> str:
        return f"dev loss {metrics['val_loss']:.4f}, dev accuracy {metrics['val_acc']:.3f}"

    def intro(self) -> str:
        if not len(self.dev_labels):
            return ""
        majority = float(torch.bincount(self.dev_labels).max()) / len(self.dev_labels)
        self.references = {"majority class": majority}
        return f"dev set: {len(self.dev_labels)} examples; always answering the majority class scores {majority:.3f}"

    def sampler(self) -> None:
        return None

    def export(self, model: nn.Module, state: dict[str, Tensor]) -> Path:
        """The classifier folder `camelid.classify.load_classifier` reads (for BERT a transformers
        BertForSequenceClassification); a probed classifier names its backbone instead of copying it."""
        from camelid.classify import save_classifier

        return save_classifier(self.classifier, self.cfg.export_path, backbone_source=self.backbone_source,
                               mode=self.mode)


# ---------------------------------------------------------------------------------------------------
# by name


KINDS: dict[str, type[CausalLM] | type[MaskedLM]] = {"clm": CausalLM, "mlm+nsp": MaskedLM}
assert set(KINDS) == set(OBJECTIVES)


def get_objective(cfg: TrainConfig, device: torch.device) -> Objective:
    """The objective `cfg.objective` names (what `camelid pretrain` trains from a prepared data folder)."""
    if cfg.objective not in KINDS:
        raise CamelidError(f"objective must be one of {', '.join(KINDS)}, got {cfg.objective!r}")
    return KINDS[cfg.objective](cfg, device)


def describe(cfg: TrainConfig, metrics: dict[str, float]) -> str:
    """The validation metrics in words (nan where there was no evaluation)."""
    kind = KINDS[cfg.objective]
    return kind.describe({k: metrics.get(k, float("nan")) for k in kind.log_fields})
