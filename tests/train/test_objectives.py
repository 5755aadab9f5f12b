"""The Objective interface: an objective written outside camelid/train (here a linear regression) runs through
the loop unchanged, and gets its log, plot, checkpoints, exact resume and export from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from camelid.train.config import TrainConfig
from camelid.train.loop import train
from camelid.train.objectives import Objective
from camelid.train.plot import read_log

TRUE_W = torch.tensor([[1.5, -2.0, 0.5, 3.0]])


class Regression:
    """y = x . w + noise; the model is one linear layer."""

    name = "regression"
    log_fields = ["val_loss", "val_r2"]
    plot_metric = ("val_r2", "R squared")
    references = {"perfect": 1.0}

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        g = torch.Generator().manual_seed(99)
        self.val_x = torch.randn(256, 4, generator=g)
        self.val_y = self.val_x @ TRUE_W.T

    def build_model(self) -> nn.Module:
        return nn.Linear(4, 1)

    def blocks(self, model: nn.Module) -> None:
        return None

    def flops_per_token(self) -> float:
        return 6.0 * 4

    def batch(self, step: int, index: int) -> tuple[Tensor, Tensor]:
        rng = np.random.default_rng([self.cfg.seed, step, index])
        x = torch.from_numpy(rng.standard_normal((self.cfg.batch_size, 4)).astype(np.float32))
        return x, x @ TRUE_W.T + 0.01 * torch.randn(self.cfg.batch_size, 1)  # noise from the loop-seeded RNG

    @staticmethod
    def loss(forward: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.mse_loss(forward(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        mse = float(F.mse_loss(model(self.val_x), self.val_y))
        return {"val_loss": mse, "val_r2": 1 - mse / float(self.val_y.var(unbiased=False))}

    @staticmethod
    def describe(metrics: dict[str, float]) -> str:
        return f"val mse {metrics['val_loss']:.4f}"

    def intro(self) -> str:
        return "fitting 4 weights"

    def sampler(self) -> None:
        return None

    def export(self, model: nn.Module, state: dict[str, Tensor]) -> Path:
        out = self.cfg.export_path
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "weights.safetensors"))
        return out


def config(out: Path, **changes) -> TrainConfig:
    return TrainConfig(**{"objective": "regression", "data": "", "out": str(out), "batch_size": 16, "block_size": 1,
                          "max_steps": 120, "lr": 0.1, "min_lr": 0.01, "warmup_steps": 5, "weight_decay": 0.0,
                          "eval_interval": 40, "checkpoint_interval": 40, "sample_interval": 0, "peak_flops": 1e9,
                          **changes})


def test_an_objective_defined_outside_the_package_trains_through_the_loop(tmp_path, capsys) -> None:
    objective: type[Objective] = Regression  # the class satisfies the protocol
    result = train(config(tmp_path / "a"), progress=False, objective=objective)
    assert result.steps == 120 and result.val_metrics["val_r2"] > 0.999
    rows = read_log(tmp_path / "a" / "log.csv")
    assert [r["step"] for r in rows if r["val_r2"]] == ["40", "80", "120"]
    assert (tmp_path / "a" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    w = load_file(tmp_path / "a" / "hf" / "weights.safetensors")["weight"]
    assert torch.allclose(w, TRUE_W, atol=0.02)
    out = capsys.readouterr().out
    assert "fitting 4 weights" in out and "step 120: train loss" in out and "val mse" in out
    # resuming from the step-80 checkpoint repeats steps 81-120 exactly (the noise is seeded per micro-batch)
    (tmp_path / "a" / "checkpoints" / "latest").write_text("step-000080\n")
    train(config(tmp_path / "a", export=False), resume=True, progress=False, objective=Regression)
    again = read_log(tmp_path / "a" / "log.csv")
    assert [(r["loss"], r["grad_norm"]) for r in again] == [(r["loss"], r["grad_norm"]) for r in rows]
