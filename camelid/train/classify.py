"""A text classifier's training, through the training loop: `camelid classify train` and `camelid compare`.

`train_classifier` turns the classifier's few options (mode, epochs, lr, batch size) into a TrainConfig and runs
camelid/train/loop.py with the classify objective (camelid/train/objectives.py: Classification), so it gets the
loop's AdamW, schedule, progress, log.csv, loss.png and, when asked, checkpoints with exact resume:

    finetune   every weight trains; lr decays linearly to 0 over the run, gradients clipped at 1
    lora       LoRA adapters over a frozen LLaMA backbone, and the head; the same schedule as finetune
    probe      the backbone is frozen and its features computed once; the head trains at a constant lr

With `select_on_dev` the dev split is scored after every epoch and the run ends with the weights of the lowest
dev loss (camelid.train.select.KeepBest), stopping early after `patience` epochs without improvement;
`tune_classifier` does that for each learning rate of a small grid and keeps the best run.
"""

from __future__ import annotations

import contextlib
import functools
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from camelid.classify import MODES, Example, TextClassifier
from camelid.errors import CamelidError
from camelid.train.config import TrainConfig
from camelid.train.loop import train
from camelid.train.objectives import Classification
from camelid.train.plot import read_log
from camelid.train.select import KeepBest
from camelid.variants.lora import LoraSpec


@dataclass
class TrainArgs:
    mode: str = "finetune"  # or "probe": backbone frozen, only the head learns
    epochs: int = 3
    lr: float | None = None  # default: 5e-5 (BERT finetune), 2e-5 (LLaMA finetune), 1e-2 (probe)
    batch_size: int = 16
    weight_decay: float = 0.01  # on matrices (not biases and norms), as in every run of the loop
    seed: int = 0
    eval_interval: int = 0  # dev evaluations every this many steps; 0: once, at the end (when there is a dev set)
    checkpoint_interval: int = 0  # 0: none (a fine-tuned LLaMA's checkpoint is three copies of its weights)
    select_on_dev: bool = False  # score dev every epoch; end with the weights of the lowest dev loss
    patience: int = 0  # with select_on_dev: stop after this many epochs without a lower dev loss (0: never)
    lora_rank: int = 8  # mode lora: rank of the adapters (alpha = 2 x rank)


def default_lr(family: str, mode: str) -> float:
    if mode == "probe":
        return 1e-2
    if mode == "lora":
        return 5e-4
    return 5e-5 if family == "bert" else 2e-5


def classifier_config(clf: TextClassifier, n_train: int, args: TrainArgs, out: Path,
                      export_dir: Path | None = None, model: str | None = None, has_dev: bool = False) -> TrainConfig:
    """The loop's settings for `args`: epochs become optimizer steps of batch_size examples."""
    if args.mode not in MODES:
        raise CamelidError(f"unknown mode {args.mode!r}; use one of {', '.join(MODES)}")
    if args.epochs < 1 or args.batch_size < 1:
        raise CamelidError(f"epochs and batch_size must be at least 1, got {args.epochs} and {args.batch_size}")
    probe = args.mode == "probe"
    steps = max(1, math.ceil(args.epochs * n_train / args.batch_size))
    per_epoch = max(1, math.ceil(n_train / args.batch_size))
    interval = (per_epoch if args.select_on_dev else args.eval_interval) or steps
    return TrainConfig(
        objective="classify", data="", out=str(out), model=model or clf.family, batch_size=args.batch_size,
        block_size=clf.max_len, max_steps=steps, lr=args.lr or default_lr(clf.family, args.mode), min_lr=0.0,
        warmup_steps=0, lr_schedule="constant" if probe else "linear", weight_decay=args.weight_decay,
        beta1=0.9, beta2=0.999, grad_clip=0.0 if probe else 1.0,
        eval_interval=interval if has_dev else 0, sample_interval=0,
        checkpoint_interval=args.checkpoint_interval, export=export_dir is not None,
        export_dir=str(export_dir or ""), seed=args.seed)


def train_classifier(clf: TextClassifier, train_set: Sequence[Example], args: TrainArgs | None = None,
                     quiet: bool = False, *, dev: Sequence[Example] = (), out: str | Path | None = None,
                     export_dir: str | Path | None = None, backbone_source: str | None = None,
                     resume: bool = False) -> dict[str, Any]:
    """Fit the classifier in place on `train_set` (scored on `dev` as it trains, when given).

    out: the run's folder (log.csv, loss.png, checkpoints; a temporary one when not given). export_dir: also
    save the trained classifier there (camelid.classify.load_classifier reads it). Returns the run's numbers."""
    args = args or TrainArgs()
    with contextlib.ExitStack() as stack:
        run = Path(out) if out is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cfg = classifier_config(clf, len(train_set), args, run, None if export_dir is None else Path(export_dir),
                                backbone_source, has_dev=bool(dev))
        if args.select_on_dev and not dev:
            raise CamelidError("choosing the stopping point on dev data needs a dev split; give the file "
                               "\"split\": \"dev\" examples")
        lora = LoraSpec(args.lora_rank, 2.0 * args.lora_rank, 0.05) if args.mode == "lora" else None
        plain = functools.partial(Classification, classifier=clf, train=train_set, dev=dev, mode=args.mode,
                                  backbone_source=backbone_source, lora=lora)
        built: list[Classification] = []
        selected: list[KeepBest] = []

        def objective(cfg: TrainConfig, device: Any) -> Classification | KeepBest:
            built.append(plain(cfg, device))
            if not args.select_on_dev:
                return built[-1]
            selected.append(KeepBest(built[-1], cfg.eval_interval, cfg.max_steps, args.patience))
            return selected[-1]

        t0 = time.perf_counter()
        result = train(cfg, resume=resume, progress=not quiet, objective=objective)
        seconds = time.perf_counter() - t0  # the probe's feature extraction included
        losses = [float(r["loss"]) for r in read_log(run / "log.csv")][-20:]
    clf.eval()
    stats: dict[str, Any] = {"train_seconds": seconds, "train_examples": len(train_set), "mode": args.mode,
                             "lr": cfg.lr, "epochs": args.epochs, "steps": result.steps,
                             "final_loss": sum(losses) / max(1, len(losses))}
    if selected:  # the weights, and so the numbers, of the epoch with the lowest dev loss
        best = selected[0]
        per_epoch = math.ceil(len(train_set) / args.batch_size)  # steps: the evaluations come every epoch
        stats.update(epochs=round(best.best_step / per_epoch, 2), max_epochs=args.epochs,
                     best_step=best.best_step, dev_loss=best.best_metrics["val_loss"],
                     dev_accuracy=best.best_metrics["val_acc"],
                     dev_history=[{"step": s, **m} for s, m in best.history])
    elif dev:
        stats.update(dev_loss=result.val_metrics["val_loss"], dev_accuracy=result.val_metrics["val_acc"])
    return {**stats, **{f"params_{k}": v for k, v in built[0].param_counts.items()}}


def tune_classifier(build: Callable[[], TextClassifier], train_set: Sequence[Example], dev: Sequence[Example],
                    lrs: Sequence[float], args: TrainArgs, quiet: bool = False,
                    out: str | Path | None = None) -> tuple[TextClassifier, dict[str, Any]]:
    """One run per learning rate, each ending at its lowest dev loss (early-stopped with `args.patience`); the
    classifier of the run with the lowest dev loss, and its numbers with every run's under "trials"."""
    if not lrs:
        raise CamelidError("give at least one learning rate to try")
    best: tuple[TextClassifier, dict[str, Any]] | None = None
    trials, seconds = [], 0.0
    for lr in lrs:
        clf = build()
        run = None if out is None else Path(out) / f"lr-{lr:g}"
        stats = train_classifier(clf, train_set, replace(args, lr=lr, select_on_dev=True), quiet, dev=dev, out=run)
        seconds += stats["train_seconds"]
        trials.append({k: stats[k] for k in ("lr", "epochs", "dev_loss", "dev_accuracy", "train_seconds")})
        if best is None or stats["dev_loss"] < best[1]["dev_loss"]:
            best = (clf, stats)
        del clf
    assert best is not None
    return best[0], {**best[1], "train_seconds": seconds, "trials": trials}
