"""The one plot module: training curves from any objective's log, and the bar charts of `camelid compare`."""

from __future__ import annotations

import csv

from camelid.train.plot import BarPanel, plot_bars, plot_log


def write_log(path, fields, rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_plot_log_draws_the_validation_metric_it_is_given_or_finds(tmp_path) -> None:
    fields = ["step", "loss", "val_loss", "val_acc"]
    rows = [{"step": s, "loss": 1 / s, "val_loss": (1 / s if s % 5 == 0 else ""), "val_acc": (s / 10 if s % 5 == 0
                                                                                           else "")}
            for s in range(1, 11)]
    write_log(tmp_path / "log.csv", fields, rows)
    for png, metric in ((tmp_path / "a.png", None), (tmp_path / "b.png", ("val_acc", "dev accuracy"))):
        plot_log(tmp_path / "log.csv", png, metric=metric, references={"majority class": 0.34}, title="t")
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    write_log(tmp_path / "empty.csv", fields, [])  # a run stopped before its first step still gets a plot
    assert plot_log(tmp_path / "empty.csv", tmp_path / "c.png").is_file()


def test_plot_bars_groups_series_and_marks_zeros(tmp_path) -> None:
    panels = [BarPanel("quality", {"accuracy": [0.9, 0.3], "macro-F1": [0.8, 0.2]}, ylim=(0, 1)),
              BarPanel("latency (ms)", {"latency": [20.0, 800.0]}, yscale="log"),
              BarPanel("training (s)", {"train": [100.0, 0.0]}, yscale="symlog", zero_label="none")]
    png = plot_bars(["bert-finetune", "llm-zeroshot"], panels, tmp_path / "bars.png", title="t")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["bars.png"]  # no temporary file left behind
