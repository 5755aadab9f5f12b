"""Every PNG camelid draws: training curves from a run's log.csv (`plot_log`, used by the training loop for
every objective) and grouped bar charts (`plot_bars`, used by `camelid compare`). matplotlib runs headless
(Agg) and the file is written atomically."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.fileio import atomic_write

# the validation metric drawn beside the loss when the caller names none: the first the log has
KNOWN_METRICS = {"val_bpb": "bits per byte", "val_mlm_acc": "MLM accuracy", "val_acc": "dev accuracy"}


def read_log(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, png: str | Path, dpi: int = 110) -> Path:
    png = Path(png)
    atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=dpi))
    _pyplot().close(fig)
    return png


def plot_log(log_csv: str | Path, png: str | Path, metric: tuple[str, str] | None = None,
             references: dict[str, float] | None = None, title: str = "") -> Path:
    """Two panels: training and validation loss per step; and one validation metric (`metric`: its column and
    axis label, e.g. ("val_bpb", "bits per byte")) with `references` as dashed horizontal lines."""
    plt = _pyplot()
    rows = read_log(log_csv)
    columns = rows[0].keys() if rows else []
    if metric is None:
        metric = next(((k, v) for k, v in KNOWN_METRICS.items() if k in columns), ("val_loss", "validation loss"))
    key, label = metric
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    evals = [r for r in rows if r.get(key)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, loss, lw=0.8, alpha=0.7, label="train")
    val = [r for r in rows if r.get("val_loss")]
    if val:
        ax1.plot([int(r["step"]) for r in val], [float(r["val_loss"]) for r in val], "o-", label="validation")
    if evals:
        ax2.plot([int(r["step"]) for r in evals], [float(r[key]) for r in evals], "o-", label="model")
    for i, (name, value) in enumerate((references or {}).items()):
        ax2.axhline(value, ls="--", color=f"C{i + 2}", label=f"{name} ({value:.3f})")
    ax1.set(xlabel="step", ylabel="loss (nats)", title="loss")
    ax2.set(xlabel="step", ylabel=label, title=f"validation {label}")
    for ax, where in ((ax1, "upper right"), (ax2, "best")):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=where)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, png)


@dataclass
class BarPanel:
    """One panel of `plot_bars`: one value per category for each series (several series stand side by side)."""

    title: str
    series: dict[str, Sequence[float]]
    yscale: str = "linear"  # or "log", or "symlog" (linear near zero, so a 0 still shows)
    ylim: tuple[float, float] | None = None
    zero_label: str = ""  # written where a value is 0 (e.g. "none" for an arm that trains nothing)
    colors: list[str] = field(default_factory=list)


def plot_bars(categories: Sequence[str], panels: Sequence[BarPanel], png: str | Path, title: str = "") -> Path:
    """Panels of bar charts side by side, sharing the categories on their x axes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4), squeeze=False)
    x = list(range(len(categories)))
    for ax, panel in zip(axes[0], panels, strict=True):
        n = len(panel.series)
        width = 0.8 / n
        for i, (name, values) in enumerate(panel.series.items()):
            offset = (i - (n - 1) / 2) * width
            color = panel.colors[i] if i < len(panel.colors) else None
            ax.bar([c + offset for c in x], list(values), width=width, label=name if n > 1 else None, color=color)
            for c, v in zip(x, values, strict=True):
                if v <= 0 and panel.zero_label:
                    ax.text(c + offset, 0, panel.zero_label, ha="center", va="bottom")
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        values = [v for vs in panel.series.values() for v in vs]
        if panel.yscale == "symlog" and any(v > 0 for v in values):
            ax.set_yscale("symlog", linthresh=1.0)
        elif panel.yscale == "log" and all(v > 0 for v in values):
            ax.set_yscale("log")
        if n > 1:
            ax.legend()
        ax.set_title(panel.title)
        ax.set_xticks(x)
        ax.set_xticklabels(list(categories), rotation=30, ha="right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, png)
