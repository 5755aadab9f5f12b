"""FinetuneConfig: a TrainConfig (the loop's knobs) plus what fine-tuning adds: the base model, the data and its
format, the method (LoRA, QLoRA, full) and packing. Loaded the way pretraining configs are (YAML/TOML + --set)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.train.config import TrainConfig, load_config

METHODS = ("lora", "full")
DATA_FORMATS = ("auto", "chat", "instruction", "text")
LONG_EXAMPLES = ("drop", "truncate")
BASE_QUANTIZE = ("none", "int8", "int4")
FINETUNE_OBJECTIVES = ("sft", "dpo", "kd")
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
TEACHER_CACHE_KINDS = ("topk", "sampled")
DPO_LOSSES = ("sigmoid", "ipo")
REFERENCES = ("cached", "live")
FIELD_NAMES = ("messages", "instruction", "input", "output", "text")


@dataclass
class FinetuneConfig(TrainConfig):
    objective: str = "sft"
    # the base model: a name (`camelid list`), a Hugging Face folder, a .gguf file or a Meta folder
    model: Any = "smollm2-135m-instruct"
    # the data: .jsonl / .jsonl.gz files of chat ({"messages": [...]}) or instruction ({"instruction", "input",
    # "output"}) records, or text (.txt files, or jsonl {"text"}); several files separated by commas
    data: str = ""
    data_format: str = "auto"  # auto (from the first record), chat, instruction or text
    fields: dict[str, str] = field(default_factory=dict)  # record keys, e.g. {output: response, instruction: prompt}
    system_prompt: str = ""  # a system message put before instruction records (chat records bring their own)
    split_field: str = "split"  # records with this field are split by its value...
    train_split: str = "train"
    val_split: str = "dev"  # ...into training and held-out examples
    val_data: str = ""  # else held-out examples from these files
    val_fraction: float = 0.0  # else this fraction of the examples, drawn with the seed
    val_examples: int = 0  # > 0: keep this many held-out records, drawn with the seed (a quicker held-out loss)
    long_examples: str = "drop"  # examples longer than block_size + 1 tokens: drop, or truncate (always reported)
    packing: bool = True  # several examples per row (block-diagonal attention, positions restart per example)
    epochs: float = 0.0  # > 0: max_steps is set to this many passes over the training rows
    # the method: LoRA (QLoRA with quantize int8/int4: a frozen quantised base) or full fine-tuning
    method: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: Any = "all"  # all, or some of wq wk wv wo w1 w3 w2 (a list or "wq,wv")
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    quantize: str = "none"  # the frozen base of a LoRA: none (as loaded, fp32), int8 or int4 (QLoRA)
    # glibc: tensors over 128 KiB get pages of their own, returned to the OS when freed; without it the heap
    # keeps freed activations and the peak RSS grows by ~0.5 GB (rows of 512, SmolLM2); costs ~1.4x CPU per step
    return_freed_memory: bool = False
    # the loop's settings, with defaults for fine-tuning
    out: str = "out/finetune"
    batch_size: int = 4  # rows per micro-batch
    block_size: int = 1024  # tokens per row
    max_steps: int = 100
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    beta2: float = 0.999
    eval_interval: int = 50
    sample_interval: int = 0
    sample_prompt: str = ""  # a user message answered every sample_interval steps
    checkpoint_interval: int = 50
    # DPO (objective: dpo) on {"prompt", "chosen", "rejected"} records
    dpo_loss: str = "sigmoid"  # sigmoid (DPO) or ipo
    dpo_beta: float = 0.1  # the strength of the pull towards the reference (IPO's tau)
    label_smoothing: float = 0.0  # the share of pairs assumed mislabelled (conservative DPO), sigmoid only
    reference: str = "cached"  # cached: reference log-probs computed once, kept on disk; live: every step
    reference_cache: str = ""  # the cache file (default: out/reference/<hash of model, adapter and data>.safetensors)
    # knowledge distillation (objective: kd) on the same data as SFT
    teacher: str = ""  # the teacher model (live), also the tokenizer of a fresh student
    teacher_cache: str = ""  # else a cache of its distributions, written once by `camelid teacher-cache`
    teacher_cache_kind: str = "topk"  # topk: its k largest logits; sampled: tokens drawn from its distribution
    teacher_topk: int = 20  # logits per position kept in a topk cache
    teacher_samples: int = 32  # tokens drawn per position for a sampled cache (at most 255; repeats kept as counts)
    student: Any = ""  # a fresh student: a preset name or LlamaConfig fields ({preset: tiny-mha, dim: 256, ...})
    kd_loss: str = "forward_kl"  # forward_kl, reverse_kl or jsd
    kd_beta: float = 0.5  # the mixture weight of jsd
    kd_temperature: float = 1.0
    kd_ratio: float = 0.5  # the loss: kd_ratio x distillation + (1 - kd_ratio) x next-token cross-entropy

    @property
    def export_path(self) -> Path:
        """out/adapter (LoRA: the adapter alone) or out/hf (full fine-tuning), unless export_dir is set."""
        if self.export_dir:
            return Path(self.export_dir)
        return Path(self.out) / ("adapter" if self.method == "lora" else "hf")

    def validate(self) -> None:
        super().validate()
        choices = {"objective": FINETUNE_OBJECTIVES, "dpo_loss": DPO_LOSSES, "reference": REFERENCES,
                   "kd_loss": KD_LOSSES, "teacher_cache_kind": TEACHER_CACHE_KINDS,
                   "method": METHODS, "data_format": DATA_FORMATS, "long_examples": LONG_EXAMPLES,
                   "quantize": BASE_QUANTIZE}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise CamelidError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.model, str) or not self.model:
            raise CamelidError(f"model must name the base checkpoint (e.g. smollm2-135m-instruct), got {self.model!r}")
        if not isinstance(self.fields, dict) or any(k not in FIELD_NAMES or not isinstance(v, str)
                                                    for k, v in self.fields.items()):
            raise CamelidError(f"fields maps record keys for {', '.join(FIELD_NAMES)} to the names in your data "
                               f"(e.g. --set 'fields={{output: response}}'), got {self.fields!r}")
        for name in ("split_field", "train_split", "val_split", "val_data", "system_prompt", "data"):
            if not isinstance(getattr(self, name), str):
                raise CamelidError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.quantize != "none" and self.method != "lora":
            raise CamelidError(f"quantize={self.quantize} freezes a quantised base for LoRA (QLoRA); set method=lora")
        if not 0.0 <= self.val_fraction < 1.0:
            raise CamelidError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not isinstance(self.val_examples, int) or self.val_examples < 0:
            raise CamelidError(f"val_examples must be 0 (all held-out records) or a positive count, got "
                               f"{self.val_examples!r}")
        if self.epochs < 0:
            raise CamelidError(f"epochs must be 0 (use max_steps) or positive, got {self.epochs}")
        if self.distributed == "fsdp":
            raise CamelidError("fine-tuning runs under torchrun with distributed=ddp (FSDP is for pretraining)")
        if self.objective == "dpo":
            if not self.dpo_beta > 0:
                raise CamelidError(f"dpo_beta must be positive, got {self.dpo_beta}")
            if not 0.0 <= self.label_smoothing < 0.5:
                raise CamelidError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
            if self.reference == "live" and self.method != "lora":
                raise CamelidError("reference=live recomputes the reference as the base with the adapters off; it "
                                   "needs "
                                   "method=lora (full fine-tuning uses the cached reference)")
        if self.objective == "kd":
            if not 0.0 <= self.kd_ratio <= 1.0 or not 0.0 < self.kd_beta < 1.0 or not self.kd_temperature > 0:
                raise CamelidError(f"kd_ratio must be in [0, 1], kd_beta in (0, 1) and kd_temperature positive, got "
                                   f"{self.kd_ratio}, {self.kd_beta}, {self.kd_temperature}")
            if not isinstance(self.teacher_topk, int) or self.teacher_topk < 1:
                raise CamelidError(f"teacher_topk must be a positive count, got {self.teacher_topk!r}")
            if not isinstance(self.teacher_samples, int) or not 1 <= self.teacher_samples <= 255:
                raise CamelidError(f"teacher_samples must be a count from 1 to 255, got {self.teacher_samples!r}")
            if (self.teacher_cache and self.teacher_cache_kind == "sampled" and self.kd_loss != "forward_kl"
                    and self.kd_ratio > 0):
                raise CamelidError(f"a sampled teacher cache estimates forward KL only, not {self.kd_loss}; set "
                                   "kd_loss=forward_kl or teacher_cache_kind=topk")
            if self.student and not self.teacher:
                raise CamelidError("a fresh student takes the teacher's tokenizer: set teacher (the cache alone has "
                                   "none)")
        if self.method == "lora":
            self.lora_spec()  # rank, alpha, dropout and targets checked now

    def lora_spec(self) -> Any:
        from camelid.variants.lora import LoraSpec

        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets, self.rslora)


def load_finetune_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    cfg = load_config(path, overrides, cls=FinetuneConfig)
    assert isinstance(cfg, FinetuneConfig)
    return cfg
