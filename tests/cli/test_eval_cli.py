"""`camelid eval` on the default model: the table on stdout, JSON/Markdown/PNG files, a progress bar with
examples/s, and one-line errors for bad task files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import camelid
from camelid.eval import Evaluator, Settings, resolve_tasks


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "camelid", "eval", *args], capture_output=True, text=True,
                          timeout=900)


def test_eval_writes_table_json_and_chart(tmp_path: Path) -> None:
    text = tmp_path / "excerpt.txt"
    text.write_text((Path(__file__).resolve().parents[2] / "data/austen/persuasion.txt").read_text()[5000:7000])
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"instruction": "Repeat the word.", "input": "Paris", "output": "Paris"}) + "\n")
    out = tmp_path / "out"
    r = run_cli("physical_intuition", str(text), str(gen), "--limit", "4", "--max-length", "64",
                "--max-new-tokens", "4", "--threads", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "| physical_intuition | 4 | acc ↑ |" in r.stdout and "| excerpt | 1 | bits_per_byte ↓ |" in r.stdout
    assert "| gen | 1 | rouge_l ↑ |" in r.stdout
    assert "ex/s" in r.stderr or "s/ex" in r.stderr  # the progress bar's rate
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["limit"] == 4 and report["settings"]["max_length"] == 64 and report["threads"] == 2
    (run,) = report["runs"]
    assert run["precision"] == "fp32" and run["max_length"] == 64
    mc, ppl, g = run["results"]
    assert mc["examples"] == 4 and len(mc["per_example"]) == 4 and 0 <= mc["metrics"]["acc"] <= 1
    assert ppl["chance"]["bits_per_byte"] > ppl["metrics"]["bits_per_byte"] > 0.5
    assert "prediction" in g["per_example"][0]
    assert (out / "eval.md").read_text() in r.stdout
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"

    # the same numbers from the Python API
    ev = Evaluator(camelid.load(), Settings(limit=4, max_length=64), show_progress=False)
    again = ev.run(resolve_tasks(["physical_intuition"])[0])["per_example"]  # other threads: other rounding
    for a, b in zip(again, mc["per_example"], strict=True):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4) and a["answer"] == b["answer"]


def test_bad_task_files_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n'
                   '{"question": "q", "choices": ["a", "b"], "answer": 0}\n'
                   '{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    r = run_cli(str(bad), "-o", str(tmp_path / "out"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{bad}:3: answer index 5 is out of range for 2 choices" in r.stderr
    r = run_cli("physical_intuition", "--precision", "int3")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "choose from fp32, int8, int4" in r.stderr
