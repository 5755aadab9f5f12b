"""The training loop, top to bottom (in the spirit of nanoGPT), for every objective (camelid/train/objectives.py:
a LLaMA's next-token prediction, BERT's masked-LM + next-sentence prediction, a text classifier's fine-tuning).

One optimizer step = grad_accum micro-batches per process x world_size processes. Micro-batch g of step s
(g counted across all processes) is drawn from (seed, s, g) alone, and so is the torch RNG state its forward
pass starts from (dropout), so a run split over 2 processes sees the same data and masks as one process
accumulating 2 micro-batches, and a resumed run sees what it would have seen had it never stopped.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute

from camelid.checksums import folder_files, write_manifest
from camelid.errors import CamelidError
from camelid.fileio import atomic_write
from camelid.train import checkpoint as ckpt
from camelid.train import distributed as D
from camelid.train.config import TrainConfig
from camelid.train.flops import gpu_peak, measure_matmul_peak
from camelid.train.objectives import Objective, ObjectiveFactory, autocast, get_objective

LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "val_loss", "val_bpb", "tokens", "elapsed_s", "tokens_per_s", "mfu",
              "cpu_s"]


PACE_STEPS = 50  # a time budget's pace: the mean of the last steps (evaluations included)


def log_fields(val_fields: list[str]) -> list[str]:
    """The CSV columns: the objective's validation metrics between grad_norm and tokens."""
    return LOG_FIELDS[:4] + val_fields + LOG_FIELDS[6:]


# ---------------------------------------------------------------------------------------------------
# pieces


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Linear warmup from 0, then down to min_ratio at max_steps: "cosine" (the formula of transformers'
    get_cosine_with_min_lr_schedule_with_warmup), "linear", or "constant" (no decay)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The torch RNG seed micro-batch `index` of step `step` starts from: its dropout masks depend on these alone."""
    return int(np.random.SeedSequence([seed, step, index, 1]).generate_state(1, np.uint64)[0]) >> 1


def steps_that_fit(budget_s: float, spent_s: float, done: int, seconds_per_step: float, max_steps: int) -> int:
    """The last step a time budget reaches at the current pace (never before `done`, never past max_steps)."""
    return max(done, min(max_steps, done + int((budget_s - spent_s) / max(seconds_per_step, 1e-9))))


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                    compiled: bool = False) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms or biases); fused kernels on GPU, foreach on CPU.

    compiled: its step() will run under torch.compile (on CPU): the same AdamW math, with the learning rate a
    tensor so that the schedule changing it does not recompile the step."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if device.type == "cuda":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    if compiled:
        lr = torch.tensor(cfg.lr, dtype=torch.float64)  # float64: the same lr as a Python float's
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), foreach=True, capturable=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


def compiles_optimizer(cfg: TrainConfig, device: torch.device, fsdp: bool) -> bool:
    """Whether `compile=true` also compiles the optimizer step: on CPU, where inductor fuses the foreach AdamW's
    dozen passes over the parameters into one loop (about 3% of a step on the Austen model); GPUs have the fused
    kernel already, and FSDP2's sharded parameters are left to the plain step."""
    return cfg.compile and device.type == "cpu" and not fsdp


def match_optimizer_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                         compiled: bool) -> None:
    """After loading a checkpoint, which may come from a run with the other kind of step (compiled or not):
    give the restored groups the lr type and `capturable` flag that `build_optimizer(compiled=...)` would."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, dtype=torch.float64) if compiled else lr
        group["capturable"] = compiled
    scheduler.base_lrs = [float(lr) for lr in scheduler.base_lrs]  # the schedule writes into a tensor lr


def use_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute every block in the backward pass instead of keeping its activations (from the outside:
    the block's forward is wrapped, its parameters and their names stay as they are)."""
    for block in blocks:
        block.forward = functools.partial(recompute, block.forward, use_reentrant=False)


class CsvLog:
    """One row per optimizer step; on resume, rows past the checkpoint (from the killed run) are dropped.
    When the `tensorboard` package is installed the same numbers also go to out/tensorboard."""

    def __init__(self, path: Path, resume_step: int | None, fields: list[str] = LOG_FIELDS) -> None:
        self.path = path
        self.fields = fields
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        except ImportError:  # tensorboard is optional: CSV alone then
            pass
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        self.fh = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
        self.writer = csv.DictWriter(self.fh, fieldnames=fields)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.fh.flush()

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: row.get(k, "") for k in self.fields})
        self.fh.flush()
        if self.tb is not None:
            for key in (k for k in self.fields if k not in ("step", "tokens", "elapsed_s")):
                if row.get(key, "") != "":
                    self.tb.add_scalar(f"{'val' if key.startswith('val') else 'train'}/{key}", float(row[key]),
                                       row["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


@dataclass
class TrainResult:
    steps: int  # optimizer steps done (fewer than max_steps when a time budget ended the run)
    final_loss: float
    val_loss: float
    val_bpb: float  # nan for mlm+nsp
    tokens: int
    seconds: float
    out: Path
    val_metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation, as the objective names it


# ---------------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          objective: ObjectiveFactory | None = None) -> TrainResult:
    """Train what `objective` (a factory called with (cfg, device); default: the one cfg.objective names)
    builds, writing logs, plot, checkpoints and the export under cfg.out."""
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    info = D.setup(cfg.device)
    try:
        result = _train(cfg, info, resume, progress, objective or get_objective)
        D.barrier(info)  # no rank tears the process group down while another is still in a collective
        return result
    finally:
        D.teardown(info)


def _train(cfg: TrainConfig, info: D.DistInfo, resume: bool, progress: bool,
           make_objective: ObjectiveFactory) -> TrainResult:
    from tqdm import tqdm

    device, out = info.device, Path(cfg.out)
    if (cfg.time_budget_s or cfg.cpu_budget_s) and info.enabled:
        raise CamelidError("time_budget_s and cpu_budget_s need one process (each would stop at its own step); "
                           "under torchrun set max_steps instead")
    objective: Objective = make_objective(cfg, device)  # the data, and what is trained on it
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_partial(out)
        atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n"))

    # the model, identical on every process (same seed), then wrapped for DDP / FSDP2
    torch.manual_seed(cfg.seed)
    raw = objective.build_model().to(device)
    blocks = objective.blocks(raw)
    if cfg.activation_checkpointing and blocks is not None:
        use_activation_checkpointing(blocks)
    fsdp = info.enabled and cfg.distributed == "fsdp"
    model = D.wrap(raw, cfg.distributed, info, blocks)  # `raw` itself when there is one process
    compile_opt = compiles_optimizer(cfg, device, fsdp)
    optimizer = build_optimizer(model, cfg, device, compiled=compile_opt)
    horizon = cfg.max_steps  # the last step; a time budget may bring it closer
    schedule_end = float(horizon)  # the step the schedule ends at (with a budget: follows the budget's use)
    min_ratio = cfg.min_lr / cfg.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, schedule_end, min_ratio, cfg.lr_schedule))

    # an objective that trains a few tensors over a frozen model (LoRA) checkpoints those alone
    kept = ({n for n, p in raw.named_parameters() if p.requires_grad}
            if getattr(objective, "saves_trainable_only", False) else None)
    counts_tokens = hasattr(objective, "tokens")  # rows with padding: count real tokens, not token slots
    start, spent_before, cpu_before, tokens_before = 0, 0.0, 0.0, 0
    if resume:
        state = _restore(out, raw, model, optimizer, scheduler, fsdp, kept)
        start = int(state["step"])
        tokens_before = int(state.get("tokens", 0))
        match_optimizer_step(optimizer, scheduler, compile_opt)
        if start >= cfg.max_steps:
            raise CamelidError(f"the checkpoint is at step {start}, already at max_steps {cfg.max_steps}; "
                               "raise max_steps to train further")
        if cfg.time_budget_s or cfg.cpu_budget_s:  # the budget counts the time before the interruption too
            horizon = min(cfg.max_steps, int(state.get("horizon", cfg.max_steps)))
            schedule_end = float(state.get("schedule_end", horizon))
        spent_before = float(state.get("train_seconds", 0.0))
        cpu_before = float(state.get("train_cpu_seconds", 0.0))
    forward = torch.compile(model) if cfg.compile else model
    optimizer_step = torch.compile(optimizer.step) if compile_opt else optimizer.step

    tok_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * info.world_size
    flops_tok = objective.flops_per_token()
    # per-device peak times the processes, as tok_per_step counts the tokens of all of them
    peak = (cfg.peak_flops or (gpu_peak(device) if device.type == "cuda" else None) or
            measure_matmul_peak(device)) * info.world_size
    sampler = objective.sampler() if cfg.sample_interval and info.is_main and not fsdp else None
    log = CsvLog(out / "log.csv", start if resume else None, log_fields(objective.log_fields)) if info.is_main else None
    bar = tqdm(total=horizon, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not (progress and info.is_main))
    n_params = sum(p.numel() for p in raw.parameters())  # tied weights are counted once
    if info.is_main:
        bar.write(f"model {n_params / 1e6:.2f}M parameters, {tok_per_step} tokens/step, "
                  f"{info.world_size} process(es) on {device.type}" + (f" ({cfg.distributed})" if info.enabled else ""))
        if cfg.eval_interval and (intro := objective.intro()):
            bar.write(intro)

    t_start = time.perf_counter()
    cpu_start = time.process_time()  # this process's CPU time, all its threads: a busy machine does not shrink it
    marks = collections.deque([(0.0, 0.0)], maxlen=PACE_STEPS + 1)  # (wall, CPU) seconds after the last steps
    loss_value, val_metrics, done = float("nan"), {}, start
    tokens_seen = tokens_before if counts_tokens else start * tok_per_step
    model.train()
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        lr = float(scheduler.get_last_lr()[0])  # a tensor when the optimizer step is compiled
        loss_sum = torch.zeros((), device=device)
        step_tokens = 0
        for micro in range(cfg.grad_accum):
            last_micro = micro == cfg.grad_accum - 1
            index = info.rank * cfg.grad_accum + micro
            torch.manual_seed(micro_batch_seed(cfg.seed, step, index))
            batch = objective.batch(step, index)
            with _sync(model, info, fsdp, last_micro), autocast(cfg, device):
                loss = objective.loss(forward, batch)
            with _sync(model, info, fsdp, last_micro):
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            step_tokens += objective.tokens(batch) if counts_tokens else 0
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        optimizer_step()
        done = step + 1
        if cfg.time_budget_s or cfg.cpu_budget_s:  # the schedule decays to the last step that fits, re-estimated
            horizon = cfg.max_steps                   # at every step (whichever budget ends first)
            marks.append((time.perf_counter() - t_start, time.process_time() - cpu_start))
            for i, (budget, spent) in enumerate(((cfg.time_budget_s, spent_before), (cfg.cpu_budget_s, cpu_before))):
                if budget:  # the pace of the recent steps: a run whose steps grow dearer (a phase) is not misled
                    pace = (marks[-1][i] - marks[0][i]) / (len(marks) - 1)
                    horizon = min(horizon, steps_that_fit(budget, spent + marks[-1][i], done, pace, cfg.max_steps))
            bar.total = horizon
            # the schedule runs on the share of the budget spent, not on steps: steps of unequal cost (an
            # objective's cheap first phase) would otherwise end it early, at the dear steps' expense
            used = max(spent / budget for budget, spent in ((cfg.time_budget_s, spent_before + marks[-1][0]),
                                                             (cfg.cpu_budget_s, cpu_before + marks[-1][1])) if budget)
            w = cfg.warmup_steps
            schedule_end = min(float(cfg.max_steps), w + (done - w) / used) if done > w and used > 0 else float(horizon)
        last = done >= horizon
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = D.all_mean(loss_sum / cfg.grad_accum, info).item()
        if not math.isfinite(loss_value):
            raise CamelidError(f"the loss became {loss_value} at step {done}; lower lr or raise warmup_steps")
        if counts_tokens:  # summed over processes
            step_tokens = int(D.all_mean(torch.tensor(float(step_tokens), device=device), info).item()
                              * info.world_size + 0.5)
        else:
            step_tokens = tok_per_step
        tokens_seen += step_tokens
        dt = time.perf_counter() - t0
        mfu = flops_tok * step_tokens / dt / peak
        # repr() writes the shortest string that reads back to the same float: resumed runs compare bitwise
        row: dict[str, Any] = {"step": done, "loss": repr(loss_value), "lr": repr(lr),
                               "grad_norm": repr(float(grad_norm)), "tokens": tokens_seen,
                               "elapsed_s": f"{time.perf_counter() - t_start:.3f}",
                               "tokens_per_s": f"{step_tokens / dt:.1f}", "mfu": f"{mfu:.4f}",
                               "cpu_s": f"{cpu_before + time.process_time() - cpu_start:.3f}"}

        if cfg.eval_interval and (done % cfg.eval_interval == 0 or last):
            # the last evaluation always covers the whole validation split
            val_metrics = objective.evaluate(raw, full=last)
            row.update({k: repr(v) for k, v in val_metrics.items()})
            if info.is_main:
                bar.write(f"step {done}: train loss {loss_value:.4f}, {objective.describe(val_metrics)}")
            stop_early = getattr(objective, "stop_early", None)  # e.g. camelid.train.select.KeepBest
            if stop_early is not None and stop_early() and not last:
                last = True
                if info.is_main:
                    bar.write(f"step {done}: stopping early, the held-out loss stopped improving")
        if sampler is not None and (done % cfg.sample_interval == 0 or last):
            text = sampler(raw, done)
            bar.write(f"--- sample at step {done} ---\n{text}\n---")
            with open(out / "samples.txt", "a") as fh:
                fh.write(f"--- step {done} ---\n{text}\n")
        if log is not None:
            log.write(row)
        if done % max(1, cfg.log_interval) == 0 or last:
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{step_tokens / dt:,.0f}",
                            mfu=f"{100 * mfu:.1f}%", refresh=False)
        bar.update(1)
        if cfg.checkpoint_interval and (done % cfg.checkpoint_interval == 0 or last):
            spent = spent_before + time.perf_counter() - t_start
            _save(out, done, raw, model, optimizer, scheduler, cfg, info, fsdp,
                  {"horizon": horizon, "schedule_end": schedule_end, "train_seconds": spent, "tokens": tokens_seen,
                   "train_cpu_seconds": cpu_before + time.process_time() - cpu_start}, kept)
        if last:
            break
    bar.close()
    seconds = time.perf_counter() - t_start
    if info.is_main and log is not None:
        log.close()
        from camelid.train.plot import plot_log

        plot_log(out / "log.csv", out / "loss.png", metric=objective.plot_metric,
                 references=objective.references or None, title=f"{objective.name}: {n_params / 1e6:.2f}M parameters")
    if cfg.export:
        _export(raw, model, objective, info, fsdp)
    nan = float("nan")
    return TrainResult(done, loss_value, val_metrics.get("val_loss", nan), val_metrics.get("val_bpb", nan),
                       tokens_seen, seconds, out, val_metrics)


def _sync(model: nn.Module, info: D.DistInfo, fsdp: bool, last: bool) -> contextlib.AbstractContextManager:
    """Gradients are synchronised across processes only on the last micro-batch of a step."""
    if not info.enabled or last:
        if fsdp:
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if fsdp:
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()


# ---------------------------------------------------------------------------------------------------
# checkpoints and export


def _full_states(raw: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return raw.state_dict(), optimizer.state_dict()


def _save(out: Path, step: int, raw: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: Any, cfg: TrainConfig, info: D.DistInfo, fsdp: bool, extra: dict[str, Any],
          kept: set[str] | None = None) -> None:
    model_state, optim_state = _full_states(raw, model, optimizer, fsdp)  # every process takes part under FSDP
    if kept is not None:
        model_state = {k: v for k, v in model_state.items() if k in kept}
    if info.is_main:
        train_state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                       "rng": ckpt.rng_state(), "world_size": info.world_size, **extra}
        meta = {"tokens": step * cfg.batch_size * cfg.block_size * cfg.grad_accum * info.world_size,
                "config": cfg.to_dict()}
        ckpt.save(out, step, model_state, train_state, meta, keep=cfg.keep_checkpoints)
    D.barrier(info)


def _restore(out: Path, raw: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             fsdp: bool, kept: set[str] | None = None) -> dict[str, Any]:
    """Load the latest checkpoint into the model, optimizer, scheduler and RNGs; returns its train state.
    `kept`: the names a checkpoint of only the trained tensors holds (the rest of the model is as built)."""
    path = ckpt.latest(out)
    weights, state, _meta = ckpt.load(path)
    expected = set(raw.state_dict()) if kept is None else kept
    missing = expected - set(weights) - _tied_names(raw)
    if missing or set(weights) - expected:
        raise CamelidError(f"{path}: its weights do not fit this model (missing {sorted(missing)[:3]}, unexpected "
                           f"{sorted(set(weights) - expected)[:3]}); use the config that wrote it")
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        if raw.config.tie_embeddings:
            weights["output.weight"] = weights["tok_embeddings.weight"]
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        device = next(raw.parameters()).device
        raw.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)  # in place: ties hold
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise CamelidError(f"{path}: optimizer state does not fit this run ({e}); resume with the same "
                               "config and number of processes") from None
    scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
    return state


def _tied_names(raw: nn.Module) -> set[str]:
    """Names of tensors that are another's (a tied output head): checkpoints store each tensor once."""
    seen, tied = set(), set()
    for name, t in raw.state_dict().items():
        if t.data_ptr() in seen and t.numel():
            tied.add(name)
        seen.add(t.data_ptr())
    return tied


def _export(raw: nn.Module, model: nn.Module, objective: Objective, info: D.DistInfo, fsdp: bool) -> None:
    """The final weights, written by the objective where users load them from (cfg.export_path), ended by a
    SHA256SUMS of the folder's files."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().cpu() for k, v in raw.state_dict().items()}
    if info.is_main:
        started = time.time() - 2  # the files this export writes, not what an earlier one left there
        path = objective.export(raw, state)
        if path is not None and Path(path).is_dir():  # camelid.load checks the files against it
            path = Path(path)
            write_manifest(path, [f for f in folder_files(path) if (path / f).stat().st_mtime >= started])
    D.barrier(info)
