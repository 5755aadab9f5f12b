"""The loss-curve PNG: training loss and validation loss, and validation bits per byte with references
(MLM accuracy for a BERT run, exact match for a vision run)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_log(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def plot_log(log_csv: str | Path, png: str | Path, references: dict[str, float] | None = None,
             title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from camelid.fileio import atomic_write

    rows = read_log(log_csv)
    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    evals = [r for r in rows if r.get("val_loss")]
    metrics = {"val_bpb": "bits per byte", "val_mlm_acc": "MLM accuracy", "val_acc": "held-out exact match"}
    key = next((k for k in metrics if k in (rows[0] if rows else {})), "val_bpb")
    label = metrics[key]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, loss, lw=0.8, alpha=0.7, label="train")
    if evals:
        ax1.plot([int(r["step"]) for r in evals], [float(r["val_loss"]) for r in evals], "o-", label="validation")
        ax2.plot([int(r["step"]) for r in evals], [float(r[key]) for r in evals], "o-", label="model")
    for i, (name, value) in enumerate((references or {}).items()):
        ax2.axhline(value, ls="--", color=f"C{i + 2}", label=f"{name} ({value:.3f})")
    ax1.set(xlabel="step", ylabel="loss (nats / token)", title="loss")
    ax2.set(xlabel="step", ylabel=label, title=f"validation {label}")
    for ax, where in ((ax1, "upper right"), (ax2, "lower left")):  # the curves fall from top left
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc=where)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    atomic_write(png, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return png
