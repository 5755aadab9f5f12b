"""Knowledge distillation (objective: kd): a teacher's next-token distributions teach a student, mixed with the
usual next-token loss, on the fine-tuning data (camelid.finetune.data: chat, instruction or text examples).

At every learned position, with temperature T, teacher distribution p = softmax(t / T) and student q =
softmax(s / T):

    forward_kl   KL(p || q)            (the student covers what the teacher believes; Hinton et al. 2015)
    reverse_kl   KL(q || p)            (the student commits to the teacher's modes)
    jsd          beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q  (generalised JSD, GKD)

as trl's GKDTrainer.generalized_jsd_loss computes them (beta 0 is forward KL, 1 reverse KL), averaged over the
learned tokens; the loss is kd_ratio x that + (1 - kd_ratio) x the next-token cross-entropy.

The teacher is `teacher` (any model camelid loads with the student's vocabulary), live in memory, or read from
`teacher_cache`, a file `camelid teacher-cache` writes once (so the teacher never shares memory with the student):

    topk      its k largest logits per position. The teacher's distribution is its softmax over those k tokens;
              forward KL compares it with the student's full-vocabulary log-probabilities at them (which also
              pulls the student's mass onto them), reverse KL and JSD with the student renormalised over the same
              k tokens. A biased estimate: the teacher's tail is dropped.
    sampled   n tokens drawn per position from p (sparse logit sampling, Anshumann et al. 2025), kept as the
              distinct ids, how often each was drawn and log p there. With weights w = count / n,
              sum w (log p - log q) is an unbiased estimate of KL(p || q), and so is its gradient in the
              student's logits (E[w] = p). Forward KL only.

The student is `model` (a checkpoint to fine-tune, LoRA or full), or with `student` (a preset name or LlamaConfig
fields) a fresh camelid LLaMA of that shape with the teacher's vocabulary and tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from camelid.errors import CamelidError
from camelid.fileio import atomic_write
from camelid.finetune.config import FinetuneConfig
from camelid.finetune.data import Batch, Example, RowStream, load_sft_data, make_batch, steps_for_epochs
from camelid.finetune.objective import SFT, HeadAt, load_tokenizer, load_training_model
from camelid.train import distributed as D
from camelid.train.config import TrainConfig
from camelid.train.objectives import autocast

CACHE_FORMAT = "camelid-teacher-topk-1"
SAMPLED_FORMAT = "camelid-teacher-sampled-1"


@dataclass(frozen=True)
class SampledTeacher:
    """Tokens drawn from the teacher's distribution at N positions, padded to U per position: ids [N, U], weights
    [N, U] (each token's share of the draws; 0 in padding) and the teacher's log-probabilities there [N, U]."""

    ids: Tensor
    weights: Tensor
    logprobs: Tensor


def sample_teacher(logits: Tensor, draws: int, temperature: float = 1.0,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw `draws` tokens with replacement from softmax(logits [N, V] / temperature) at each position; returns the
    distinct tokens of all positions in order (ids [M], counts [M], log-probabilities [M]) and how many each
    position has (lengths [N])."""
    logp = torch.log_softmax(logits.float() / temperature, -1)
    drawn = torch.multinomial(logp.exp(), draws, replacement=True, generator=generator).sort(-1).values
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]  # each distinct token's first draw, per position in id order
    rows = torch.arange(len(drawn)).unsqueeze(1).expand_as(drawn)[first]
    ids = drawn[first]
    counts = torch.bincount(first.flatten().cumsum(0) - 1, minlength=len(ids))
    return ids, counts, logp[rows, ids], first.sum(1)


def gather_sampled(cache: dict[str, Tensor], positions: Tensor) -> SampledTeacher:
    """The sampled cache's tokens at `positions` (indices of learned positions), padded to the longest."""
    starts, lengths = cache["starts"][positions], cache["lengths"][positions].long()
    width = max(1, int(lengths.max())) if len(positions) else 1
    slot = torch.arange(width)
    real = slot < lengths[:, None]
    index = torch.where(real, starts[:, None] + slot, 0)
    counts = torch.where(real, cache["counts"][index].float(), 0.0)
    return SampledTeacher(torch.where(real, cache["ids"][index].long(), 0), counts / counts.sum(-1, keepdim=True),
                          torch.where(real, cache["logprobs"][index].float(), 0.0))


def distill_loss(student_logits: Tensor, teacher: Tensor | tuple[Tensor, Tensor] | SampledTeacher,
                 kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Per-position divergence [N] between the student's logits [N, V] and the teacher's: full logits [N, V],
    (top-k values [N, k], their token ids [N, k]), or tokens drawn from it (SampledTeacher: forward KL only)."""
    s = torch.log_softmax(student_logits.float() / temperature, -1)
    if isinstance(teacher, SampledTeacher):
        if kind != "forward_kl":
            raise CamelidError(f"a sampled teacher cache estimates forward KL only, not {kind}; set "
                               "kd_loss=forward_kl or teacher_cache_kind=topk")
        return (teacher.weights * (teacher.logprobs - s.gather(1, teacher.ids))).sum(-1)
    if isinstance(teacher, tuple):
        values, ids = teacher
        t = torch.log_softmax(values.float() / temperature, -1)
        s = s.gather(1, ids.long())
        if kind != "forward_kl":
            s = torch.log_softmax(s, -1)  # the student over the same k tokens
    else:
        t = torch.log_softmax(teacher.float() / temperature, -1)
    if kind == "forward_kl":
        return F.kl_div(s, t, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(t, s, reduction="none", log_target=True).sum(-1)
    if kind != "jsd":
        raise CamelidError(f"kd_loss must be forward_kl, reverse_kl or jsd, got {kind!r}")
    b = torch.tensor(beta, dtype=s.dtype)
    m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), 0)
    return (beta * F.kl_div(m, t, reduction="none", log_target=True)
            + (1 - beta) * F.kl_div(m, s, reduction="none", log_target=True)).sum(-1)


def logits_at(model: nn.Module, b: Batch, device: torch.device) -> Tensor:
    return model(b.input_ids, b.documents.positions(device), b.documents, b.loss_positions)


# ---------------------------------------------------------------------------------------------------
# the offline top-k cache


def examples_key(examples: list[Example], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for e in examples:
        h.update(json.dumps([e.ids, [int(x) for x in e.trained]]).encode())
    return h.hexdigest()


def teacher_identity(source: str) -> str:
    """SHA-256 of the teacher's weight files (the model a cache was computed from)."""
    from camelid.llm import resolve

    path = resolve(source)
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".gguf",
                                                                                          ".bin", ".pth", ".json"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def write_teacher_cache(cfg: FinetuneConfig, progress: bool = True) -> dict[str, float]:
    """Run the teacher once over the training examples and keep, at every learned position, in cfg.teacher_cache:
    its top-k logits (fp16 values, int32 token ids), or (teacher_cache_kind sampled) the distinct tokens of
    teacher_samples draws from its distribution at kd_temperature (int32 ids, uint8 counts, fp16 log-probabilities,
    a uint8 count of them per position); returns {tokens, bytes, bytes_per_token, seconds}."""
    from tqdm import tqdm

    if not cfg.teacher or not cfg.teacher_cache:
        raise CamelidError("writing a teacher cache needs teacher (the model) and teacher_cache (the file to write)")
    device = torch.device("cpu")
    tok = load_tokenizer(cfg.teacher)
    data = load_sft_data(cfg, tok)
    teacher = HeadAt(load_training_model(cfg.teacher)).eval().requires_grad_(False)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    k = cfg.teacher_topk
    sampled = cfg.teacher_cache_kind == "sampled"
    generator = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    values: list[Tensor] = []
    ids: list[Tensor] = []
    counts: list[Tensor] = []
    lengths: list[Tensor] = []
    rows = [[i] for i in range(len(data.train))]
    for s in tqdm(range(0, len(rows), cfg.batch_size), desc=f"teacher {cfg.teacher_cache_kind} cache", unit="batch",
                  disable=not progress):
        b = make_batch(data.train, rows[s:s + cfg.batch_size], pad)
        with autocast(cfg, device):
            logits = logits_at(teacher, b, device)
        if sampled:
            token_ids, token_counts, logprobs, n = sample_teacher(logits, cfg.teacher_samples, cfg.kd_temperature,
                                                                  generator)
            ids.append(token_ids.int())
            counts.append(token_counts.to(torch.uint8))
            values.append(logprobs.half())
            lengths.append(n.to(torch.uint8))
        else:
            top = logits.topk(k, -1)
            values.append(top.values.half())
            ids.append(top.indices.int())
    trained = [e.n_trained for e in data.train]
    key = examples_key(data.train, _cache_settings(cfg))
    tensors = {"ids": torch.cat(ids),
               "offsets": torch.tensor([0, *torch.tensor(trained).cumsum(0).tolist()], dtype=torch.int64)}
    if sampled:
        tensors |= {"counts": torch.cat(counts), "logprobs": torch.cat(values), "lengths": torch.cat(lengths)}
    else:
        tensors["values"] = torch.cat(values)
    path = Path(cfg.teacher_cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    meta = {"format": SAMPLED_FORMAT if sampled else CACHE_FORMAT, "key": key,
            "teacher": teacher_identity(cfg.teacher), "vocab_size": str(teacher.config.vocab_size),
            **({"draws": str(cfg.teacher_samples)} if sampled else {"k": str(k)})}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))
    n = int(tensors["offsets"][-1])
    size = path.stat().st_size
    return {"tokens": float(n), "bytes": float(size), "bytes_per_token": size / max(1, n),
            "seconds": time.perf_counter() - t0}


def _cache_settings(cfg: FinetuneConfig) -> dict[str, Any]:
    if cfg.teacher_cache_kind == "sampled":
        return {"format": SAMPLED_FORMAT, "draws": cfg.teacher_samples, "temperature": cfg.kd_temperature,
                "seed": cfg.seed, "dtype": cfg.dtype}
    return {"format": CACHE_FORMAT, "k": cfg.teacher_topk, "dtype": cfg.dtype}


def read_teacher_cache(path: Path, key: str, vocab_size: int, teacher: str | None = None,
                       kind: str = "topk") -> dict[str, Tensor]:
    """The cached teacher (`kind`: topk or sampled); a cache for other data or settings, another teacher
    (`teacher`: its identity), another vocabulary or inconsistent contents is a one-line error."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError) as e:
        raise CamelidError(f"{path}: not a readable teacher cache ({e}); write it with `camelid teacher-cache`"
                           ) from None
    formats = {CACHE_FORMAT: "topk", SAMPLED_FORMAT: "sampled"}
    if meta.get("format") not in formats:
        raise CamelidError(f"{path}: not a camelid teacher cache; write it with `camelid teacher-cache`")
    if formats[meta["format"]] != kind:
        raise CamelidError(f"{path}: a {formats[meta['format']]} teacher cache, but teacher_cache_kind is {kind}; "
                           f"set teacher_cache_kind={formats[meta['format']]} or rewrite the cache")
    if meta.get("key") != key:
        raise CamelidError(f"{path}: stale teacher cache: it was written for other data or settings (key "
                           f"{str(meta.get('key'))[:12]}, this run needs {key[:12]}); rewrite it with "
                           "`camelid teacher-cache` and the same config")
    if teacher is not None and meta.get("teacher") != teacher:
        raise CamelidError(f"{path}: stale teacher cache: it was written by another teacher model; rewrite it with "
                           "`camelid teacher-cache`")
    if int(meta.get("vocab_size", -1)) != vocab_size:
        raise CamelidError(f"{path}: the teacher's vocabulary has {meta.get('vocab_size')} tokens, the student's "
                           f"{vocab_size}; distillation needs the same vocabulary")
    _check_cache(path, tensors, kind, vocab_size, int(meta.get("draws", 0)))
    if kind == "sampled":
        tensors["starts"] = torch.cumsum(tensors["lengths"].long(), 0) - tensors["lengths"].long()
    return tensors


def _check_cache(path: Path, t: dict[str, Tensor], kind: str, vocab_size: int, draws: int) -> None:
    """The shapes, dtypes and ranges the loss relies on (so a damaged cache fails here, not inside a step)."""
    names = {"topk": {"values", "ids", "offsets"}, "sampled": {"ids", "counts", "logprobs", "lengths", "offsets"}}
    ok = set(t) == names[kind] and t["offsets"].ndim == 1 and len(t["offsets"]) > 0 and int(t["offsets"][0]) == 0 \
        and bool((t["offsets"].diff() >= 0).all())
    positions = int(t["offsets"][-1]) if ok else -1
    if ok and kind == "topk":
        ok = t["values"].shape == t["ids"].shape and t["ids"].ndim == 2 and len(t["ids"]) == positions
    elif ok:
        n = len(t["ids"])
        ok = (t["lengths"].dtype == torch.uint8 and t["counts"].dtype == torch.uint8 and len(t["lengths"]) == positions
              and t["counts"].shape == t["logprobs"].shape == (n,) and int(t["lengths"].long().sum()) == n
              and bool((t["lengths"] > 0).all()) and 0 < draws <= 255
              and bool((torch.segment_reduce(t["counts"].float(), "sum", lengths=t["lengths"].long()) == draws).all()))
    if ok and len(t["ids"]):
        ok = int(t["ids"].min()) >= 0 and int(t["ids"].max()) < vocab_size
    if not ok:
        raise CamelidError(f"{path}: a damaged {kind} teacher cache (its tensors do not fit together); rewrite it "
                           "with `camelid teacher-cache`")


# ---------------------------------------------------------------------------------------------------
# the objective


class KD(SFT):
    """Distillation on SFT's data, batches and held-out loss; see the module docstring."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        if not isinstance(cfg, FinetuneConfig):
            raise CamelidError("the kd objective takes a FinetuneConfig (camelid finetune CONFIG --set objective=kd)")
        if not cfg.teacher and not cfg.teacher_cache:
            raise CamelidError("objective=kd needs a teacher (a model) or a teacher_cache (from "
                               "`camelid teacher-cache`)")
        if cfg.student:
            cfg.method = "full"  # a fresh student trains every weight
        self.cfg, self.device = cfg, device
        self.tokenizer = load_tokenizer(cfg.teacher if cfg.student else cfg.model)
        self.data = load_sft_data(cfg, self.tokenizer)
        tok = self.tokenizer
        self.pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
        self.stream = RowStream(self.data.train, cfg.block_size, cfg.packing, cfg.seed)
        self.micro_per_step = cfg.grad_accum * D.world_size()
        if cfg.epochs:
            cfg.max_steps = steps_for_epochs(self.stream, cfg.epochs, self.micro_per_step * cfg.batch_size)
        teacher = Path(str(cfg.teacher)).name
        if cfg.teacher_cache:
            teacher = f"a cache of {cfg.teacher_samples} draws" if cfg.teacher_cache_kind == "sampled" \
                else f"top-{cfg.teacher_topk} cache"
        self.name = f"KD ({cfg.kd_loss}, ratio {cfg.kd_ratio:g}) from {teacher}"
        self.references: dict[str, float] = {}
        self.saves_trainable_only = cfg.method == "lora" and not cfg.student
        self.model_config: Any = None
        self._step_trained: dict[int, int] = {}
        self.teacher: HeadAt | None = None
        self.cache: dict[str, Tensor] = {}

    def build_model(self) -> nn.Module:
        from camelid.config import LlamaConfig
        from camelid.variants.lora import apply_lora
        from camelid.variants.training import TrainLlama

        cfg = self.cfg
        if cfg.student:
            tok = self.tokenizer
            fields = {"preset": cfg.student} if isinstance(cfg.student, str) else dict(cfg.student)
            preset = fields.pop("preset", "tiny-mha")
            config = LlamaConfig.from_name(preset, **{"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id,
                                                      "eos_token_id": tok.eos_id, **fields})
            llama = TrainLlama(config).requires_grad_(True)
        else:
            llama = load_training_model(cfg.model, cfg.quantize)
            llama = llama.requires_grad_(True) if cfg.method == "full" else apply_lora(llama, cfg.lora_spec())
        if cfg.block_size > llama.config.max_seq_len:
            raise CamelidError(f"block_size {cfg.block_size} exceeds the student's context window "
                               f"{llama.config.max_seq_len}; lower block_size")
        self.model_config = llama.config
        vocab = llama.config.vocab_size
        if cfg.kd_ratio == 0:  # next-token loss alone: no teacher needed (the baseline of a comparison)
            pass
        elif cfg.teacher_cache:
            key = examples_key(self.data.train, _cache_settings(cfg))
            self.cache = read_teacher_cache(Path(cfg.teacher_cache), key, vocab,
                                            teacher_identity(cfg.teacher) if cfg.teacher else None,
                                            cfg.teacher_cache_kind)
        else:
            teacher = load_training_model(cfg.teacher)
            if teacher.config.vocab_size != vocab:
                raise CamelidError(f"teacher {cfg.teacher} has a vocabulary of {teacher.config.vocab_size} tokens, the "
                                   f"student {vocab}; distillation needs the same vocabulary (a student with the "
                                   "teacher's tokenizer)")
            self.teacher = HeadAt(teacher).to(self.device).eval().requires_grad_(False)
        return HeadAt(llama)

    @staticmethod
    def blocks(model: nn.Module) -> nn.ModuleList:
        return model.llama.layers

    def _teacher(self, step: int, index: int, b: Batch) -> Tensor | tuple[Tensor, Tensor] | SampledTeacher | None:
        if self.cfg.kd_ratio == 0:
            return None
        if self.teacher is not None:
            with torch.no_grad():
                return logits_at(self.teacher, b, self.device)
        offsets = self.cache["offsets"]
        rows = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for row in self._rows(step, index)
                          for i in row])
        if "lengths" in self.cache:
            t = gather_sampled(self.cache, rows)
            return SampledTeacher(t.ids.to(self.device), t.weights.to(self.device), t.logprobs.to(self.device))
        return self.cache["values"][rows].to(self.device), self.cache["ids"][rows].to(self.device)

    def batch(self, step: int, index: int) -> tuple[Batch, float, Any]:  # type: ignore[override]
        b, weight = super().batch(step, index)
        return b, weight, self._teacher(step, index, b)

    def loss(self, forward: nn.Module, batch: tuple[Batch, float, Any]) -> Tensor:  # type: ignore[override]
        cfg = self.cfg
        b, weight, teacher = batch
        logits = logits_at(forward, b, self.device)
        ce = F.cross_entropy(logits, b.targets.flatten().index_select(0, b.loss_positions))
        if teacher is None:
            return ce * weight
        kd = distill_loss(logits, teacher, cfg.kd_loss, cfg.kd_beta, cfg.kd_temperature).mean()
        return (cfg.kd_ratio * kd + (1 - cfg.kd_ratio) * ce) * weight

    @staticmethod
    def tokens(batch: tuple[Batch, float, Any]) -> int:  # type: ignore[override]
        return batch[0].tokens

    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        """SFT's held-out loss: the student's next-token loss per learned token."""
        return SFT.evaluate(self, model.llama, full)

    def sampler(self) -> Any:
        sample = SFT.sampler(self)
        return None if sample is None else (lambda model, step: sample(model.llama, step))

    def export(self, model: nn.Module, state: dict[str, Tensor]) -> Path:
        inner = {k.removeprefix("llama."): v for k, v in state.items()}
        return SFT.export(self, model.llama, inner)


def distill(cfg: FinetuneConfig, resume: bool = False, progress: bool = True) -> Any:
    """Run the loop with the KD objective; returns the loop's TrainResult."""
    from camelid.train.loop import train

    return train(cfg, resume=resume, progress=progress, objective=KD)
