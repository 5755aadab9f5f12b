"""What `camelid pretrain` trains, chosen by `objective`: the pieces of the loop that depend on the model.

    clm       next-token prediction for a LLaMA, on token shards from `camelid prepare`
    mlm+nsp   BERT's masked-LM (15%, 80/10/10) + next-sentence prediction (50% random), on sentence pairs from
              `camelid prepare --objective mlm+nsp`

An objective builds the model, draws micro-batch `index` of step `step` from (seed, step, index) alone (so
exact resume holds for both), computes the loss, evaluates on the held-out split, and exports a Hugging Face
folder. The loop (camelid/train/loop.py) does everything else the same way for both.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.errors import CamelidError
from camelid.train.config import OBJECTIVES, TrainConfig

Batch = Any  # whatever an objective's batch() returns and its loss() reads


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
    references: dict[str, float] = {}  # horizontal lines on the validation plot

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

    def build_model(self) -> nn.Module:
        from camelid.train.fast import TrainLlama

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
        from camelid.tokenizer.train import load_tokenizer

        tokenizer = load_tokenizer(self.cfg.tokenizer or self.data.dir / "tokenizer.json")
        return lambda model, step: sample_text(model, tokenizer, self.data.meta["eos_id"], self.cfg, step)

    def export(self, raw: nn.Module, state: dict[str, Tensor], out: Path) -> None:
        """The final weights as a Hugging Face LlamaForCausalLM folder, with the tokenizer beside them."""
        from camelid.interop.hf import save_hf_dir
        from camelid.model import Llama

        with torch.device("meta"):
            plain = Llama(raw.config)
        plain.load_state_dict(state, assign=True, strict=False)
        plain.tie_weights()
        plain.rope.inv_freq = raw.rope.inv_freq.detach().cpu()
        save_hf_dir(plain, out)
        tok = Path(self.cfg.tokenizer) if self.cfg.tokenizer else self.data.dir / "tokenizer.json"
        if tok.is_dir():
            tok = tok / "tokenizer.json"
        shutil.copyfile(tok, out / "tokenizer.json")
        if (tok.parent / "tokenizer_config.json").is_file():
            shutil.copyfile(tok.parent / "tokenizer_config.json", out / "tokenizer_config.json")


def sample_text(model: nn.Module, tokenizer: Any, eos: int, cfg: TrainConfig, step: int) -> str:
    from camelid.generate import SamplingParams, generate

    prompt = tokenizer.encode(cfg.sample_prompt, add_special_tokens=False).ids if cfg.sample_prompt else []
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
    references: dict[str, float] = {}  # the unigram baseline's accuracy, once intro() has scored it

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        from camelid.bert.pretrain import load_pairs

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
        from camelid.bert.pretrain import batch_seed

        b = self.train_data.batch_at(self.cfg.seed, step, index, self.cfg.batch_size)
        # dropout, too, is drawn from (seed, step, index) alone: a resumed run, or the same global batch split
        # over more processes, drops the same units
        torch.manual_seed(batch_seed(self.cfg.seed + 1, step, index))
        return {k: v.to(self.device, non_blocking=True) for k, v in b.items()}

    @staticmethod
    def loss(forward: nn.Module, batch: Batch) -> Tensor:
        from camelid.bert.pretrain import IGNORE, pretraining_loss

        chosen = batch["mlm_labels"] != IGNORE
        mlm_logits, nsp_logits = forward(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                         masked=chosen)
        return pretraining_loss(mlm_logits, nsp_logits, batch["mlm_labels"][chosen], batch["nsp_labels"])

    def _scores(self, model: nn.Module, full: bool) -> dict[str, float]:
        from camelid.bert.pretrain import score, unigram_counts

        if self._unigram is None:
            self._unigram = unigram_counts(self.train_data.documents, self.tokenizer)
        cfg = self.cfg
        max_pairs = 0 if full or not cfg.eval_tokens else max(1, cfg.eval_tokens // cfg.block_size)
        batches = self.val_data.heldout_batches(cfg.seed, cfg.batch_size, max_pairs)
        with autocast(cfg, self.device):
            return score(model, batches, self._unigram, self.tokenizer.vocab_size, self.device)

    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        """On held-out pairs (each held-out sentence once as A; the first eval_tokens / block_size pairs unless
        `full`): val_loss (MLM + NSP, as the training loss), MLM loss and accuracy, NSP accuracy."""
        s = self._scores(model, full)
        return {"val_loss": s["mlm_loss"] + s["nsp_loss"], "val_mlm_loss": s["mlm_loss"],
                "val_mlm_acc": s["mlm_accuracy"], "val_nsp_acc": s["nsp_accuracy"]}

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

    def export(self, raw: nn.Module, state: dict[str, Tensor], out: Path) -> None:
        """The final weights as a Hugging Face BertForPreTraining folder, with the WordPiece vocabulary."""
        from camelid.bert.model import BertForPreTraining
        from camelid.interop.bert_hf import save_bert_hf_dir

        with torch.device("meta"):
            plain = BertForPreTraining(raw.config)
        plain.load_state_dict(state, assign=True, strict=False)
        plain.tie_weights()
        save_bert_hf_dir(plain, out)
        self.tokenizer.save(out)


class _Constant(nn.Module):
    """Zero logits for every position: lets `score` report the unigram baselines without a model."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, attention_mask: Tensor,
                masked: Tensor) -> tuple[Tensor, Tensor]:
        return input_ids.new_zeros(int(masked.sum()), self.vocab_size, dtype=torch.float), \
            input_ids.new_zeros(len(input_ids), 2, dtype=torch.float)


KINDS: dict[str, type[CausalLM] | type[MaskedLM]] = {"clm": CausalLM, "mlm+nsp": MaskedLM}
assert set(KINDS) | {"vision"} == set(OBJECTIVES)


def _kind(name: str) -> type:
    if name == "vision":  # imported here: camelid.vision imports this module
        from camelid.vision.objective import VisionQA

        return VisionQA
    return KINDS[name]


def get_objective(cfg: TrainConfig, device: torch.device) -> Any:
    return _kind(cfg.objective)(cfg, device)


def describe(cfg: TrainConfig, metrics: dict[str, float]) -> str:
    """The validation metrics in words (nan where there was no evaluation)."""
    kind = _kind(cfg.objective)
    return kind.describe({k: metrics.get(k, float("nan")) for k in kind.log_fields})
