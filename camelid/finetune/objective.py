"""SFT: supervised fine-tuning of a loaded LLaMA as an objective of the one training loop (camelid/train/loop.py).

The model is the base checkpoint's training twin (camelid.variants.training.TrainLlama: the fast kernels, the
head and loss together, packed rows attended document by document); with method=lora its block linears are
wrapped by LoRA (camelid.variants.lora) over a frozen base, fp32 or quantised int8/int4 (QLoRA), and only the
adapters train, are checkpointed and exported (peft's format, plus a GGUF adapter for llama.cpp); with
method=full every weight trains and the export is a Hugging Face folder.

The loss of a step is the mean over every learned token of the step, whatever micro-batch or process it fell
in: each micro-batch's summed loss is divided by the step's total learned tokens (known in advance from (seed,
step)), so 2 processes compute what 1 process accumulating 2 micro-batches does, and packing does not change the
loss. Validation: the same mean on the held-out examples (val_loss, nats per learned token).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid import heap
from camelid.errors import CamelidError
from camelid.finetune.config import FinetuneConfig
from camelid.finetune.data import (
    Batch,
    RowStream,
    SFTData,
    heldout_batches,
    load_sft_data,
    make_batch,
    steps_for_epochs,
)
from camelid.train import distributed as D
from camelid.train.config import TrainConfig
from camelid.train.objectives import autocast


class HeadAt(nn.Module):
    """The training LLaMA (`llama`) with its output head applied at some flat positions of the batch only (the
    learned tokens): `forward` returns the fp32 logits there [N, V] (distillation), or, given `targets`, each
    row's summed log-probability of its targets at those positions [B] (DPO), the [N, V] logits then never held
    whole when the head is frozen (camelid.ops.head_loss.token_logprobs). A module of its own so that DDP sees
    the student's or policy's forward."""

    def __init__(self, llama: nn.Module) -> None:
        super().__init__()
        self.llama = llama

    @property
    def config(self) -> Any:
        return self.llama.config

    def forward(self, input_ids: Tensor, positions: Tensor | None, mask: Any, loss_positions: Tensor,
                targets: Tensor | None = None) -> Tensor:
        from camelid.ops.head_loss import token_logprobs

        B, T = input_ids.shape
        h = self.llama.hidden_states(input_ids, positions, mask=mask).flatten(0, 1).index_select(0, loss_positions)
        weight = self.llama.output.weight
        if targets is None:
            return F.linear(h, weight).float()
        token_logps = token_logprobs(h, weight, targets.flatten().index_select(0, loss_positions))
        return torch.zeros(B, dtype=token_logps.dtype, device=h.device).index_add(0, loss_positions // T, token_logps)


def load_tokenizer(source: str) -> Any:
    """The tokenizer stored with the base model (a fine-tune is rendered with the model's own chat template)."""
    from camelid.llm import model_tokenizer, resolve

    tok = model_tokenizer(resolve(source))
    if tok is None:
        raise CamelidError(f"{source}: no tokenizer beside the weights; fine-tuning renders the data with the "
                           "model's tokenizer and chat template")
    return tok


def load_training_model(source: str, quantize: str = "none") -> nn.Module:
    """The base checkpoint as the training model (camelid.variants.training.TrainLlama). With quantize int8/int4
    (QLoRA) its block linears are quantised while the checkpoint streams in, for Hugging Face folders and GGUF
    files, so the fp32 model is never in memory; other formats are loaded whole first."""
    import camelid
    from camelid.formats import Format, detect
    from camelid.llm import resolve
    from camelid.variants.lora import build_quantized_base, quantize_base
    from camelid.variants.training import TrainLlama

    path = resolve(source)
    fmt = detect(path)
    if quantize != "none" and fmt in (Format.HF, Format.GGUF):
        if fmt is Format.HF:
            from camelid.interop.hf import read_hf_tensors

            config, where, tensors = read_hf_tensors(path)
        else:
            from camelid.interop.gguf import read_gguf_tensors

            config, tensors = read_gguf_tensors(path)
            where = str(path)
        with torch.device("meta"):
            model = TrainLlama(config)
        return build_quantized_base(model, tensors, quantize, where)
    model = TrainLlama.from_model(camelid.load(source, tokenizer=False).model)
    return quantize_base(model, quantize) if quantize != "none" else model


def release_freed_memory() -> None:
    """Hand memory freed while loading (the fp32 tensors a quantised base streamed through) back to the OS:
    glibc keeps freed heap pages in the process, where they would count in its peak RSS for the whole run."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class SFT:
    """Supervised fine-tuning on chat / instruction / text examples; see the module docstring."""

    log_fields = ["val_loss"]
    plot_metric = ("val_loss", "held-out loss (nats per learned token)")

    def __init__(self, cfg: TrainConfig, device: torch.device, data: SFTData | None = None) -> None:
        if not isinstance(cfg, FinetuneConfig):
            raise CamelidError("the sft objective takes a FinetuneConfig (camelid finetune CONFIG)")
        if cfg.objective != "sft":
            raise CamelidError(f"objective={cfg.objective} is not trained by finetune(); use camelid.finetune.dpo.dpo "
                               "(or `camelid finetune --set objective=dpo`)")
        self.cfg, self.device = cfg, device
        self.tokenizer = load_tokenizer(cfg.model)
        self.data = data or load_sft_data(cfg, self.tokenizer)
        tok = self.tokenizer
        self.pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
        self.stream = RowStream(self.data.train, cfg.block_size, cfg.packing, cfg.seed)
        self.micro_per_step = cfg.grad_accum * D.world_size()
        if cfg.epochs:  # the loop reads max_steps after building the objective
            cfg.max_steps = steps_for_epochs(self.stream, cfg.epochs, self.micro_per_step * cfg.batch_size)
        self.name = f"{Path(cfg.model).name} {'LoRA' if cfg.method == 'lora' else 'full fine-tune'}" + \
            (f" over an {cfg.quantize} base" if cfg.quantize != "none" else "")
        self.references: dict[str, float] = {}
        self.saves_trainable_only = cfg.method == "lora"  # checkpoints hold the adapters and their optimizer state
        self.model_config: Any = None
        self._step_trained: dict[int, int] = {}

    # -- the model ------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from camelid.variants.lora import apply_lora, quantize_head

        cfg = self.cfg
        if cfg.return_freed_memory:
            heap.return_freed_buffers()
        model = load_training_model(cfg.model, cfg.quantize)
        if cfg.block_size > model.config.max_seq_len:
            raise CamelidError(f"block_size {cfg.block_size} exceeds the base model's context window "
                               f"{model.config.max_seq_len}; lower block_size")
        self.model_config = model.config
        if cfg.method == "full":
            return model.requires_grad_(True)
        if cfg.quantize != "none":  # QLoRA: the frozen embedding and head as int8 rows too
            quantize_head(model)
            release_freed_memory()
        return apply_lora(model, cfg.lora_spec())

    @staticmethod
    def blocks(model: nn.Module) -> nn.ModuleList:
        return model.layers

    def flops_per_token(self) -> float:
        """Per real token: 2 FLOPs per weight forward and 2 backward (the input's gradient) for a frozen weight,
        6 for a trained one; the head only at the learned tokens' share; attention at the examples' mean length
        (the PaLM count: scores and values, forward and backward)."""
        from camelid.config import LlamaConfig

        c = self.model_config or LlamaConfig.from_name("tiny-mha")
        d, hd = c.dim, c.head_dim
        block = c.n_layers * (d * hd * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * d * c.intermediate_size)
        widths, trained = self.stream.widths, self.stream.trained
        learned_share = sum(trained) / max(1, sum(widths))
        mean_len = sum(w * w for w in widths) / max(1, sum(widths))  # the length a token's example has, on average
        attention = 12.0 * c.n_layers * c.n_heads * hd * mean_len / 2  # causal: half the square
        if self.cfg.method == "full":
            return 6.0 * block + 6.0 * d * c.vocab_size * learned_share + attention
        spec = self.cfg.lora_spec()
        lora = c.n_layers * spec.rank * sum(_io(c, t) for t in spec.targets)
        return 4.0 * block + 6.0 * lora + 4.0 * d * c.vocab_size * learned_share + attention

    # -- data -----------------------------------------------------------------------------------------------
    def _rows(self, step: int, index: int) -> list[list[int]]:
        bs = self.cfg.batch_size
        return self.stream.rows((step * self.micro_per_step + index) * bs, bs)

    def step_trained_tokens(self, step: int) -> int:
        """Learned tokens in all micro-batches of a step, on every process together."""
        if step not in self._step_trained:
            if len(self._step_trained) > 8:
                self._step_trained.pop(min(self._step_trained))
            self._step_trained[step] = sum(self.stream.trained[i] for g in range(self.micro_per_step)
                                           for row in self._rows(step, g) for i in row)
        return self._step_trained[step]

    def batch(self, step: int, index: int) -> tuple[Batch, float]:
        b = make_batch(self.data.train, self._rows(step, index), self.pad_id).to(self.device)
        # the summed loss over the step's learned tokens, times micro-batches (the loop averages those)
        weight = b.n_trained * self.micro_per_step / max(1, self.step_trained_tokens(step))
        return b, weight

    @staticmethod
    def loss(forward: nn.Module, batch: tuple[Batch, float]) -> Tensor:
        b, weight = batch
        mean = forward(b.input_ids, b.documents.positions(b.input_ids.device), mask=b.documents, targets=b.targets,
                       loss_positions=b.loss_positions)
        return mean * weight

    @staticmethod
    def tokens(batch: tuple[Batch, float]) -> int:
        return batch[0].tokens

    # -- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        """val_loss: the mean loss per learned token of the held-out examples (the first eval_tokens of them
        unless `full`)."""
        cfg = self.cfg
        if not self.data.val:
            return {"val_loss": float("nan")}
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for b in heldout_batches(self.data.val, cfg.block_size, cfg.batch_size, self.pad_id,
                                 0 if full else cfg.eval_tokens):
            b = b.to(self.device)
            with autocast(cfg, self.device):
                mean = model(b.input_ids, b.documents.positions(self.device), mask=b.documents, targets=b.targets,
                             loss_positions=b.loss_positions)
            total += float(mean) * b.n_trained
            count += b.n_trained
        model.train(was_training)
        return {"val_loss": total / max(1, count), "val_tokens": float(count)}

    @staticmethod
    def describe(metrics: dict[str, float]) -> str:
        return f"held-out loss {metrics['val_loss']:.4f}"

    def intro(self) -> str:
        """The data in numbers (and what was dropped or cut), packing's fill, the trainable parameters; the base
        model's held-out loss is measured by the first evaluation."""
        s, d = self.stream, self.data
        rows = s.rows_per_epoch()
        lines = [f"data: {len(d.train)} training examples ({sum(s.widths):,} tokens, {sum(s.trained):,} learned), "
                 f"{len(d.val)} held-out; " + (f"packed into {rows} rows of {self.cfg.block_size} tokens per epoch, "
                                               f"{100 * s.fill():.1f}% of token slots real" if self.cfg.packing else
                                               f"one example per row, {rows} rows per epoch")]
        lines += [f"note: {n}" for n in d.notes]
        return "\n".join(lines)

    def sampler(self) -> Callable[[nn.Module, int], str] | None:
        if not self.cfg.sample_prompt:
            return None
        from camelid.generate import SamplingParams, generate

        tok, prompt = self.tokenizer, self.cfg.sample_prompt

        def sample(model: nn.Module, step: int) -> str:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = tok.encode(text, add_bos=tok.add_bos and not (tok.bos_token and text.startswith(tok.bos_token)))
            n = max(1, min(self.cfg.sample_tokens, model.config.max_seq_len - len(ids)))
            out = generate(model, ids, n, SamplingParams(), stop_ids=sorted(tok.stop_ids))
            return f"{prompt} -> {tok.decode([i for i in out if i not in tok.stop_ids])}"

        return sample

    # -- export ---------------------------------------------------------------------------------------------
    def export(self, model: nn.Module, state: dict[str, Tensor]) -> Path:
        """LoRA: the adapter in peft's format and as a GGUF LoRA adapter (adapter.gguf) in export_path. Full
        fine-tuning: a Hugging Face folder with the tokenizer."""
        out = self.cfg.export_path
        if self.cfg.method == "lora":
            from camelid.variants.lora import save_adapter, save_gguf_adapter

            save_adapter(model, out, base=self.cfg.model)
            save_gguf_adapter(model, out / "adapter.gguf")
            return out
        from camelid.interop.hf import save_hf_dir
        from camelid.variants.training import to_reference

        save_hf_dir(to_reference(model, state), out)
        self.tokenizer.save_pretrained(out)
        return out


def _io(c: Any, target: str) -> int:
    """in + out features of a block linear (a LoRA on it has rank x (in + out) weights)."""
    q, kv, f = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.intermediate_size
    return {"wq": c.dim + q, "wk": c.dim + kv, "wv": c.dim + kv, "wo": q + c.dim, "w1": c.dim + f, "w3": c.dim + f,
            "w2": f + c.dim}[target]


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True) -> Any:
    """Run the loop with the SFT objective; returns the loop's TrainResult (export in cfg.export_path)."""
    from camelid.train.loop import train

    return train(cfg, resume=resume, progress=progress, objective=SFT)


def steps_per_epoch(cfg: FinetuneConfig, data: SFTData) -> int:
    stream = RowStream(data.train, cfg.block_size, cfg.packing, cfg.seed)
    return math.ceil(stream.rows_per_epoch() / (cfg.batch_size * cfg.grad_accum * D.world_size()))
