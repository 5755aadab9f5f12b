"""DPO: direct preference optimisation (Rafailov et al. 2023) as an objective of the one training loop.

For a prompt x with a chosen answer y_w and a rejected one y_l, the policy pi (the model being trained) and a
frozen reference pi_ref (the model before training) give the log-ratio

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

and the loss is -log sigmoid(beta h) (sigmoid), with label smoothing e: -(1-e) log sigmoid(beta h) - e log
sigmoid(-beta h), or (h - 1/(2 beta))^2 (IPO, Azar et al. 2023, on log-probabilities averaged per answer token,
as trl computes it). The implicit rewards are beta x the policy-reference log-ratio of each answer; accuracy is
the share of pairs whose chosen reward exceeds the rejected one (the policy's margin above the reference's).

The reference never changes, so its log-probabilities are computed once, before the first step, and kept in a
safetensors file keyed by a SHA-256 of the reference's weights, the tokenised pairs and the settings that change
them: a cache made for another model, adapter or data is never read. With LoRA the reference is the base model
with the adapters switched off (camelid.variants.lora.lora_disabled): no second model in memory.
`reference=live` recomputes it at every step instead (for comparison).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from camelid import heap
from camelid.errors import CamelidError
from camelid.fileio import atomic_write
from camelid.finetune.config import FinetuneConfig
from camelid.finetune.data import Batch, Example, RowStream, make_batch, steps_for_epochs
from camelid.finetune.objective import (
    SFT,
    HeadAt,
    load_tokenizer,
    load_training_model,
    release_freed_memory,
)
from camelid.finetune.preference import Pair, PreferenceData, load_preference_data
from camelid.train import distributed as D
from camelid.train.config import TrainConfig
from camelid.train.objectives import autocast

CACHE_FORMAT = "camelid-reference-logps-1"


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid"
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and the chosen and rejected rewards (detached), from the answers' log-probabilities."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise CamelidError(f"dpo_loss must be sigmoid or ipo, got {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def pair_batch(pairs: Sequence[Pair], pad_id: int) -> tuple[Batch, Tensor]:
    """The chosen answers (rows 0..P-1) then the rejected ones (rows P..2P-1), one example per row, and each row's
    learned-token count."""
    examples: list[Example] = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    b = make_batch(examples, [[i] for i in range(len(examples))], pad_id)
    counts = torch.tensor([float(e.n_trained) for e in examples])
    return b, counts


def sequence_logps(model: nn.Module, b: Batch, device: torch.device) -> Tensor:
    """Each row's summed log-probability of its learned tokens [B] under `model` (a HeadAt)."""
    return model(b.input_ids, b.documents.positions(device), b.documents, b.loss_positions, b.targets)


# ---------------------------------------------------------------------------------------------------
# the reference cache


def reference_key(model: nn.Module, data: PreferenceData, settings: dict[str, Any]) -> str:
    """SHA-256 of what the reference log-probabilities depend on: the reference's weights (the base's when the
    adapters are off; LoRA tensors excluded), every pair's token ids and learned-token mask, and `settings`."""
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        if ".lora_" in name:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.flatten().view(torch.uint8).numpy())  # the tensor's own memory: no copy of a 100 MB embedding
    for split, pairs in (("train", data.train), ("val", data.val)):
        h.update(split.encode())
        for p in pairs:
            for e in (p.chosen, p.rejected):
                h.update(json.dumps([e.ids, [int(x) for x in e.trained]]).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_reference(model: nn.Module, pairs: Sequence[Pair], batch_pairs: int, pad_id: int, device: torch.device,
                      cfg: TrainConfig, desc: str = "reference") -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed log-probabilities of the answers under `model` as it is (call it inside
    lora_disabled for a LoRA'd model), in float64."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for s in tqdm(range(0, len(pairs), batch_pairs), desc=desc, unit="batch", leave=False, disable=len(pairs) < 64):
        group = pairs[s:s + batch_pairs]
        b, _ = pair_batch(group, pad_id)
        b = b.to(device)
        with autocast(cfg, device):
            logps = sequence_logps(model, b, device).double().cpu()
        chosen.append(logps[:len(group)])
        rejected.append(logps[len(group):])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def write_reference_cache(path: Path, key: str, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p),
                                           metadata={"format": CACHE_FORMAT, "key": key}))


def read_reference_cache(path: Path, key: str, sizes: dict[str, int]) -> dict[str, Tensor]:
    """The cached log-probabilities; a file made for another model, adapter or data (another key) or of the wrong
    shape is a one-line error."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError) as e:
        raise CamelidError(f"{path}: not a readable reference cache ({e}); delete it to recompute") from None
    if meta.get("format") != CACHE_FORMAT:
        raise CamelidError(f"{path}: not a camelid reference cache (format {meta.get('format')!r}); delete it or set "
                           "reference_cache to another file")
    if meta.get("key") != key:
        raise CamelidError(f"{path}: stale reference cache: it was computed for another model, adapter or data (key "
                           f"{str(meta.get('key'))[:12]}, this run needs {key[:12]}); delete it or set reference_cache "
                           "to another file")
    for name, n in sizes.items():
        if name not in tensors or tensors[name].shape != (n,):
            raise CamelidError(f"{path}: reference cache holds no {n} values for {name}; delete it to recompute")
    return tensors


# ---------------------------------------------------------------------------------------------------
# the objective


@dataclass
class PairBatch:
    batch: Batch
    counts: Tensor  # learned tokens per row
    reference: Tensor | None  # [2P] cached reference log-probabilities (chosen then rejected), or None (live)


class DPO:
    """DPO / IPO on preference pairs, LoRA (reference: adapters off) or every weight; see the module docstring."""

    log_fields = ["val_loss", "val_accuracy", "val_margin", "val_chosen_reward", "val_rejected_reward",
                  "train_accuracy", "train_margin"]
    plot_metric = ("val_accuracy", "held-out preference accuracy")

    def __init__(self, cfg: TrainConfig, device: torch.device, data: PreferenceData | None = None) -> None:
        if not isinstance(cfg, FinetuneConfig):
            raise CamelidError("the dpo objective takes a FinetuneConfig (camelid finetune CONFIG --set objective=dpo)")
        self.cfg, self.device = cfg, device
        if cfg.activation_checkpointing or cfg.return_freed_memory:
            # before the model and its activations: pairs differ in length, so every step's activations differ in
            # size, and glibc's default (serving large blocks from a heap it cannot shrink past one in use) grew a
            # LoRA-DPO process by ~150 MB a step (benchmarks/dpo_memory.py); mapped pages cost ~1.5x CPU per step,
            # so with checkpointing (memory before speed anyway) or when asked
            heap.return_freed_buffers()
        self.tokenizer = load_tokenizer(cfg.model)
        tok = self.tokenizer
        self.data = data or load_preference_data(cfg, tok)
        self.pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
        # pairs are drawn as rows of one "example" each: the stream is a permutation of the pairs per epoch
        self.stream = RowStream([p.chosen for p in self.data.train], cfg.block_size, False, cfg.seed)
        self.micro_per_step = cfg.grad_accum * D.world_size()
        if cfg.epochs:
            cfg.max_steps = steps_for_epochs(self.stream, cfg.epochs, self.micro_per_step * cfg.batch_size)
        kind = "IPO" if cfg.dpo_loss == "ipo" else "DPO"
        self.name = f"{Path(str(cfg.model)).name} {kind} ({'LoRA' if cfg.method == 'lora' else 'full'})"
        self.references: dict[str, float] = {}
        self.saves_trainable_only = cfg.method == "lora"
        self.policy: HeadAt | None = None
        self.reference: dict[str, Tensor] = {}
        self.reference_note = ""
        self._train_stats: list[Tensor] = []

    # -- the model and its reference ----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        from camelid.variants.lora import apply_lora

        cfg = self.cfg
        llama = load_training_model(cfg.model, cfg.quantize)
        if cfg.block_size > llama.config.max_seq_len:
            raise CamelidError(f"block_size {cfg.block_size} exceeds the base model's context window "
                               f"{llama.config.max_seq_len}; lower block_size")
        llama = llama.requires_grad_(True) if cfg.method == "full" else apply_lora(llama, cfg.lora_spec())
        self.policy = HeadAt(llama).to(self.device)
        if cfg.reference == "cached":
            self.reference = self._cached_reference(self.policy)
        return self.policy

    def reference_path(self, key: str) -> Path:
        return Path(self.cfg.reference_cache) if self.cfg.reference_cache else \
            Path(self.cfg.out) / "reference" / f"{key[:32]}.safetensors"

    def _cached_reference(self, policy: HeadAt) -> dict[str, Tensor]:
        from camelid.variants.lora import lora_disabled

        cfg = self.cfg
        settings = {"dtype": cfg.dtype, "adapters": "off" if cfg.method == "lora" else "none"}
        key = reference_key(policy, self.data, settings)
        path = self.reference_path(key)
        sizes = {f"{s}_{side}": len(pairs) for s, pairs in (("train", self.data.train), ("val", self.data.val))
                 for side in ("chosen", "rejected")}
        distributed = D.world_size() > 1
        if distributed and torch.distributed.get_rank() != 0:
            torch.distributed.barrier()  # the first process computes and writes it
            return read_reference_cache(path, key, sizes)
        if path.is_file():
            tensors = read_reference_cache(path, key, sizes)
            self.reference_note = f"reference log-probabilities read from {path}"
        else:
            t0 = time.perf_counter()
            tensors = {}
            with lora_disabled(policy):
                for split, pairs in (("train", self.data.train), ("val", self.data.val)):
                    c, r = compute_reference(policy, pairs, cfg.batch_size, self.pad_id, self.device, cfg,
                                             f"reference ({split})")
                    tensors[f"{split}_chosen"], tensors[f"{split}_rejected"] = c, r
            write_reference_cache(path, key, tensors)
            self.reference_note = (f"reference log-probabilities computed in {time.perf_counter() - t0:.1f} s, "
                                   f"cached in {path}")
        if distributed:
            torch.distributed.barrier()
        return tensors

    @staticmethod
    def blocks(model: nn.Module) -> nn.ModuleList:
        return model.llama.layers

    def flops_per_token(self) -> float:
        """2 FLOPs per weight forward, 2 more backward for the input's gradient, 2 more for a trained weight's
        own gradient; the reference's forward on top when it is recomputed (live)."""
        c = self.policy.config if self.policy is not None else None
        if c is None:
            return 1.0
        n = sum(p.numel() for p in self.policy.parameters())
        trained = sum(p.numel() for p in self.policy.parameters() if p.requires_grad)
        return 4.0 * n + 2.0 * trained + (2.0 * n if self.cfg.reference == "live" else 0.0)

    # -- data -----------------------------------------------------------------------------------------------
    def _pair_indices(self, step: int, index: int) -> list[int]:
        bs = self.cfg.batch_size
        return [row[0] for row in self.stream.rows((step * self.micro_per_step + index) * bs, bs)]

    def batch(self, step: int, index: int) -> PairBatch:
        release_freed_memory()  # the last step's activations are freed by now
        idx = self._pair_indices(step, index)
        b, counts = pair_batch([self.data.train[i] for i in idx], self.pad_id)
        ref = None
        if self.reference:
            t = torch.tensor(idx)
            ref = torch.cat([self.reference["train_chosen"][t], self.reference["train_rejected"][t]])
        return PairBatch(b.to(self.device), counts.to(self.device), ref.to(self.device) if ref is not None else None)

    def _losses(self, forward: nn.Module, pb: PairBatch, reference: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        logps = sequence_logps(forward, pb.batch, self.device)
        reference = reference.to(logps.dtype)
        if cfg.dpo_loss == "ipo":  # IPO on per-token averages, as trl
            logps, reference = logps / pb.counts, reference / pb.counts
        P = logps.shape[0] // 2
        return dpo_loss(logps[:P], logps[P:], reference[:P], reference[P:], cfg.dpo_beta, cfg.label_smoothing,
                        cfg.dpo_loss)

    def _live_reference(self, pb: PairBatch) -> Tensor:
        from camelid.variants.lora import lora_disabled

        assert self.policy is not None
        with torch.no_grad(), lora_disabled(self.policy):
            return sequence_logps(self.policy, pb.batch, self.device).double()

    def loss(self, forward: nn.Module, pb: PairBatch) -> Tensor:
        reference = pb.reference if pb.reference is not None else self._live_reference(pb)
        losses, chosen, rejected = self._losses(forward, pb, reference)
        self._train_stats.append(torch.stack([(chosen > rejected).float().mean(), (chosen - rejected).mean()]))
        return losses.mean()

    @staticmethod
    def tokens(pb: PairBatch) -> int:
        return pb.batch.tokens

    # -- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        """On the held-out pairs (all of them: they are few): the DPO loss, accuracy (chosen reward above the
        rejected one, i.e. the policy's margin above the reference's), mean margin and rewards; and the training
        pairs' accuracy and margin since the last evaluation."""
        cfg = self.cfg
        nan = float("nan")
        out = {k: nan for k in self.log_fields}
        if self._train_stats:
            acc, margin = torch.stack(self._train_stats).mean(0).tolist()
            out.update(train_accuracy=acc, train_margin=margin)
            self._train_stats = []
        if not self.data.val:
            return out
        was_training = model.training
        model.eval()
        results: list[Tensor] = []
        pairs = self.data.val
        for s in range(0, len(pairs), cfg.batch_size):
            group = pairs[s:s + cfg.batch_size]
            b, counts = pair_batch(group, self.pad_id)
            if self.reference:
                t = torch.arange(s, s + len(group))
                ref = torch.cat([self.reference["val_chosen"][t], self.reference["val_rejected"][t]])
            else:
                from camelid.variants.lora import lora_disabled

                with lora_disabled(model):
                    ref = sequence_logps(model, b.to(self.device), self.device).double()
            with autocast(cfg, self.device):
                results.append(torch.stack(self._losses(model, PairBatch(b.to(self.device), counts.to(self.device),
                                                                       None), ref.to(self.device)), 1).cpu())
        model.train(was_training)
        r = torch.cat(results).double()  # [pairs, (loss, chosen reward, rejected reward)]
        out.update(val_loss=float(r[:, 0].mean()), val_accuracy=float((r[:, 1] > r[:, 2]).double().mean()),
                   val_margin=float((r[:, 1] - r[:, 2]).mean()), val_chosen_reward=float(r[:, 1].mean()),
                   val_rejected_reward=float(r[:, 2].mean()))
        return out

    @staticmethod
    def describe(metrics: dict[str, float]) -> str:
        return (f"held-out DPO loss {metrics['val_loss']:.4f}, preference accuracy {metrics['val_accuracy']:.3f}, "
                f"margin {metrics['val_margin']:.4f}")

    def intro(self) -> str:
        d = self.data
        lines = [f"data: {len(d.train)} training pairs, {len(d.val)} held-out"]
        lines += [f"note: {n}" for n in d.notes]
        if self.reference_note:
            lines.append(self.reference_note)
        return "\n".join(lines)

    def sampler(self) -> Callable[[nn.Module, int], str] | None:
        sample = SFT.sampler(self)  # type: ignore[arg-type]  # reads cfg and tokenizer only
        if sample is None:
            return None
        return lambda model, step: sample(model.llama, step)

    def export(self, model: nn.Module, state: dict[str, Tensor]) -> Path:
        """As SFT's: the adapter (peft + GGUF) or a Hugging Face folder."""
        inner = {k.removeprefix("llama."): v for k, v in state.items()}
        return SFT.export(self, model.llama, inner)  # type: ignore[arg-type]  # reads cfg and tokenizer only


def dpo(cfg: FinetuneConfig, resume: bool = False, progress: bool = True) -> Any:
    """Run the loop with the DPO objective; returns the loop's TrainResult."""
    from camelid.train.loop import train

    return train(cfg, resume=resume, progress=progress, objective=DPO)
