"""Results of `camelid eval` as JSON (every setting and per-example scores), a Markdown table and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from camelid.fileio import atomic_write_text

# the metrics a table shows per task kind, and whether higher is better
SHOWN = {
    "multiple_choice": [("acc", True), ("acc_norm", True)],
    "perplexity": [("bits_per_byte", False), ("token_perplexity", False)],
    "generation": [("exact_match", True), ("rouge_l", True)],
}


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric): chance and each run's value."""
    out: list[dict[str, Any]] = []
    runs = report["runs"]
    tasks = list(dict.fromkeys((r["task"], r["kind"]) for run in runs for r in run["results"]))
    for task, kind in tasks:
        for metric, higher in SHOWN[kind]:
            values = []
            chance = None
            for run in runs:
                res = next((r for r in run["results"] if r["task"] == task), None)
                values.append(None if res is None else res["metrics"].get(metric))
                if res is not None and chance is None:
                    chance = res["chance"].get(metric)
            out.append({"task": task, "metric": metric, "higher_is_better": higher, "chance": chance,
                        "values": values, "examples": next((r["examples"] for run in runs for r in run["results"]
                                                            if r["task"] == task), 0)})
    return out


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    if metric in ("acc", "acc_norm", "acc_bytes", "exact_match", "rouge_l"):
        return f"{100 * value:.1f}"
    return f"{value:.4f}" if metric == "bits_per_byte" else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """Accuracies in percent; bits per byte and perplexities lower is better; '—' where not applicable."""
    labels = [run["label"] for run in report["runs"]]
    lines = ["| task | n | metric | chance | " + " | ".join(labels) + " |",
             "|---|---:|---|---:|" + "---:|" * len(labels)]
    for row in rows(report):
        arrow = "↑" if row["higher_is_better"] else "↓"
        cells = [_fmt(v, row["metric"]) for v in row["values"]]
        lines.append(f"| {row['task']} | {row['examples']} | {row['metric']} {arrow} | "
                     f"{_fmt(row['chance'], row['metric'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Grouped bars per task (one bar per run) with chance as a dashed line; accuracy metrics on the left,
    bits per byte on the right (camelid.train.plot.plot_bars)."""
    from camelid.train.plot import BarPanel, plot_bars

    all_rows = rows(report)
    acc = [r for r in all_rows if r["metric"] in ("acc_norm", "exact_match", "rouge_l")]
    if not acc:
        acc = [r for r in all_rows if r["metric"] == "acc"]
    bpb = [r for r in all_rows if r["metric"] == "bits_per_byte"]
    labels = [run["label"] for run in report["runs"]]
    panels = []
    for panel_rows, title in ((acc, "accuracy (higher is better)"), (bpb, "bits per byte (lower is better)")):
        if panel_rows:
            series = {label: [r["values"][j] or 0.0 for r in panel_rows] for j, label in enumerate(labels)}
            panels.append(BarPanel(
                title=title, series=series,
                categories=[f"{r['task']} {r['metric']}" if len(panel_rows) > 1 else r["task"] for r in panel_rows],
                references=[r["chance"] for r in panel_rows], reference_label="chance"))
    plot_bars([], panels, path, title=report.get("title") or "camelid eval")


def write(report: dict[str, Any], out: Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "markdown": out / "eval.md", "png": out / "eval.png"}
    atomic_write_text(paths["json"], json.dumps(report, indent=1) + "\n")
    atomic_write_text(paths["markdown"], markdown(report))
    plot(report, paths["png"])
    return paths
