"""Choosing where a run stops on held-out data: `KeepBest` wraps any objective of the loop.

After every evaluation it keeps a copy of the trained tensors when the dev loss is the lowest so far, asks the
loop to stop once `patience` evaluations in a row brought no improvement (early stopping), and puts the best
tensors back into the model when training ends, so what the loop exports and what the caller scores is the
model at its best dev loss. Only tensors that train are copied (a LoRA run copies its adapters alone).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


class KeepBest:
    """An objective that behaves like `inner`, plus best-on-dev selection and early stopping (see the module)."""

    def __init__(self, inner: Any, eval_interval: int, max_steps: int, patience: int = 0) -> None:
        self.inner = inner
        self.eval_interval, self.max_steps, self.patience = eval_interval, max_steps, patience
        self.evaluations = 0
        self.since_best = 0
        self.best_loss = math.inf
        self.best_step = 0
        self.best_metrics: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, metrics) of every evaluation
        self._best: dict[str, Tensor] | None = None

    def __getattr__(self, name: str) -> Any:  # everything else is the wrapped objective's
        return getattr(self.__dict__["inner"], name)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        metrics = self.inner.evaluate(model, full)
        self.evaluations += 1
        step = min(self.evaluations * self.eval_interval, self.max_steps)
        self.history.append((step, dict(metrics)))
        loss = float(metrics["val_loss"])
        if loss < self.best_loss:  # a nan loss is never an improvement
            self.best_loss, self.best_step, self.best_metrics = loss, step, dict(metrics)
            self._best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            self.since_best = 0
        else:
            self.since_best += 1
        if full or self.stop_early():
            self.restore(model)
        return metrics

    def stop_early(self) -> bool:
        """True once `patience` evaluations in a row did not lower the dev loss (never with patience 0)."""
        return self.patience > 0 and self.since_best >= self.patience

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        if self._best is None:
            return
        params = dict(model.named_parameters())
        for name, value in self._best.items():
            params[name].copy_(value)
