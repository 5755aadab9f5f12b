"""TrainConfig: every knob of a pretraining run in one dataclass, loaded from YAML or TOML plus overrides.

A config file is a flat mapping of TrainConfig fields; `model` is either a preset name (see
`camelid configs`) or a mapping of LlamaConfig fields (optionally with `preset:` to start from one);
with objective mlm+nsp, a BERT preset name (bert-mini, ...) or a mapping of BertConfig fields.
Overrides are `key=value` strings; the value is parsed as YAML, so `lr=3e-4`, `compile=true` and
`model.dim=128` all do what they look like.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from camelid.bert.model import BertConfig
from camelid.config import LlamaConfig
from camelid.errors import CamelidError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


# what `camelid pretrain` trains from a prepared data folder: next-token prediction (LLaMA); masked-LM +
# next-sentence prediction (BERT). Other objectives (a classifier's fine-tuning) are handed to the loop by their
# callers (camelid/train/objectives.py).
OBJECTIVES = ("clm", "mlm+nsp")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    # what is trained: clm (a LLaMA, next-token prediction) or mlm+nsp (a BERT: masked-LM + next sentence);
    # `classify` is recorded here when camelid.train.classify fine-tunes a classifier through the loop
    objective: str = "clm"
    # where things are
    data: str = "data"  # a folder written by `camelid prepare` (with the same --objective)
    out: str = "out"  # checkpoints, logs, plots and the final Hugging Face export go here
    tokenizer: str | None = None  # tokenizer.json for samples and the export; default: the one `prepare` recorded
    # the model: a preset name or a mapping of LlamaConfig fields (BertConfig fields for mlm+nsp)
    model: Any = field(default_factory=lambda: {"preset": "tiny-mha"})
    # batch: tokens per optimizer step = batch_size * block_size * grad_accum * world_size
    batch_size: int = 8  # sequences per micro-batch, per process
    block_size: int = 256  # tokens per sequence (mlm+nsp: the most tokens of a sentence pair)
    grad_accum: int = 1  # micro-batches per optimizer step, per process
    max_steps: int = 1000
    # AdamW with linear warmup from 0, then lr_schedule down to min_lr at the last step
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine, linear, or constant (stays at lr after the warmup)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # numerics and speed
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or float32 / bfloat16 / float16
    compile: bool = False  # torch.compile the model (and on CPU the AdamW step)
    threads: int = 0  # CPU threads for torch (0: torch's default); 1 is fastest on a busy machine
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    distributed: str = "ddp"  # under torchrun: ddp or fsdp (FSDP2, fully_shard)
    # evaluation, samples, logs, checkpoints (intervals in optimizer steps; 0 disables)
    eval_interval: int = 100
    eval_tokens: int = 0  # tokens of the validation split per periodic evaluation; 0: all of it
    sample_interval: int = 200
    sample_prompt: str = ""
    sample_tokens: int = 64
    log_interval: int = 10  # progress-bar refresh; the CSV gets every step
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    export: bool = True  # write a Hugging Face folder at the end
    export_dir: str = ""  # where the export goes; empty: out/hf
    # stop after this much wall time (evaluation included) with the schedule decayed: max_steps shrinks to the
    # steps that fit, re-estimated every step (one process only; such a run's length depends on the machine)
    time_budget_s: float = 0.0
    # the same with this process's CPU time (time.process_time: all its threads, evaluation included): on a shared
    # machine the wall clock counts other people's work, CPU time does not; with N busy threads it runs N times as
    # fast as the wall clock. With both budgets the run ends at whichever comes first.
    cpu_budget_s: float = 0.0
    seed: int = 1337
    peak_flops: float = 0.0  # per device, for MFU; 0: a table for known GPUs, a measured fp32 matmul peak on CPU

    def llama_config(self, vocab_size: int | None = None) -> LlamaConfig:
        """The model's LlamaConfig; `vocab_size` (from the data) fills in a missing one."""
        spec = self.model
        if isinstance(spec, str):
            spec = {"preset": spec}
        if not isinstance(spec, dict):
            raise CamelidError(f"model must be a preset name or a mapping of LlamaConfig fields, not {spec!r}")
        spec = dict(spec)
        preset = spec.pop("preset", None)
        known = {f.name for f in dataclasses.fields(LlamaConfig)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise CamelidError(f"model: unknown field(s) {', '.join(unknown)}; LlamaConfig fields are "
                               f"{', '.join(sorted(known))}")
        if vocab_size is not None and "vocab_size" not in spec:
            spec["vocab_size"] = vocab_size
        if "max_seq_len" not in spec:
            spec["max_seq_len"] = self.block_size
        base: dict[str, Any] = {}
        if preset is not None:
            base = LlamaConfig.from_name(str(preset)).to_dict()
            base.pop("name")
        return LlamaConfig(**{**base, "name": spec.pop("name", preset or "custom"), **spec})

    def bert_config(self, vocab_size: int, pad_token_id: int = 0) -> BertConfig:
        """The model's BertConfig (objective mlm+nsp): a BERT preset name or a mapping of BertConfig fields;
        vocab_size (from the WordPiece vocabulary) and max_seq_len (block_size) fill in missing ones."""
        spec = self.model
        if isinstance(spec, str):
            spec = {"preset": spec}
        if not isinstance(spec, dict):
            raise CamelidError(f"model must be a BERT preset name or a mapping of BertConfig fields, not {spec!r}")
        spec = dict(spec)
        preset = spec.pop("preset", None)
        if preset is not None and str(preset).lower() not in BertConfig.names():
            raise CamelidError(f"model: {preset!r} is not a BERT config; objective mlm+nsp trains a BERT, set model "
                               f"to one of {', '.join(BertConfig.names())} (e.g. --set model=bert-mini)")
        known = {f.name for f in dataclasses.fields(BertConfig)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise CamelidError(f"model: unknown field(s) {', '.join(unknown)}; BertConfig fields are "
                               f"{', '.join(sorted(known))}")
        spec.setdefault("vocab_size", vocab_size)
        spec.setdefault("max_seq_len", self.block_size)
        spec.setdefault("pad_token_id", pad_token_id)
        if preset is not None:
            return BertConfig.from_name(str(preset), **spec)
        return BertConfig(**spec)

    @property
    def export_path(self) -> Path:
        return Path(self.export_dir) if self.export_dir else Path(self.out) / "hf"

    def validate(self) -> None:
        """The settings every objective shares (the objective's name is checked where it is looked up)."""
        for name in ("batch_size", "block_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                raise CamelidError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.distributed not in ("ddp", "fsdp"):
            raise CamelidError(f"distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise CamelidError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.min_lr > self.lr:
            raise CamelidError(f"min_lr {self.min_lr} is above lr {self.lr}; lower min_lr")
        if self.lr_schedule not in SCHEDULES:
            raise CamelidError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.time_budget_s < 0:
            raise CamelidError(f"time_budget_s must be 0 (none) or a number of seconds, got {self.time_budget_s}")
        if self.cpu_budget_s < 0:
            raise CamelidError(f"cpu_budget_s must be 0 (none) or a number of CPU seconds, got {self.cpu_budget_s}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CamelidError(f"{path}: no such config file; give a .yaml or .toml file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) or {}
        else:
            raise CamelidError(f"{path}: unknown config format; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise CamelidError(f"{path}: not valid {path.suffix[1:].upper()} ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise CamelidError(f"{path}: the top level must be a mapping of settings")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key=value` (value parsed as YAML); `model.dim=128` sets a field of the model mapping."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CamelidError(f"override {item!r} is not key=value; write e.g. --set lr=3e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if key.startswith("model."):
            model = data.get("model", TrainConfig().model)
            model = {"preset": model} if isinstance(model, str) else dict(model)
            model[key.removeprefix("model.")] = value
            data["model"] = model
        else:
            data[key] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """A config file plus `key=value` overrides as `cls` (TrainConfig, or a subclass such as fine-tuning's)."""
    data = read_config_file(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CamelidError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    defaults = cls()
    for key, value in data.items():
        default = getattr(defaults, key)
        # YAML reads 1e-3 as a string and 3 as an int; coerce to the field's type where it is plain
        if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                data[key] = float(value)
            except ValueError:
                raise CamelidError(f"{key} must be a number, got {value!r}") from None
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise CamelidError(f"{key} must be true or false, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
            raise CamelidError(f"{key} must be an integer, got {value!r}")
    cfg = cls(**data)
    cfg.validate()
    return cfg
