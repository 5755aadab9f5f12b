from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from camelid.cli import COMMAND_MODULES, app

for _m in COMMAND_MODULES:
    __import__(_m)

runner = CliRunner()


def test_bench_tiny_writes_json_and_chart(tmp_path) -> None:
    result = runner.invoke(app, ["bench", "--model", "tiny-gqa", "--prompt-len", "16", "--new-tokens", "4",
                                 "--rounds", "1", "--threads", "1", "--out", str(tmp_path),
                                 "--engines", "camelid:fp32-eager,camelid:fp32,camelid:int8,transformers:fp32"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert set(data["medians"]) == {"camelid fp32-eager", "camelid fp32", "camelid int8", "transformers fp32"}
    for row in data["medians"].values():
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["peak_rss_mib"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0
    # the memory read bandwidth of the run, and what the fp32 engine's decode streams of it
    assert data["read_bandwidth_gb_s"]["median"] > 0 and len(data["read_bandwidth_gb_s"]["rounds"]) == 1
    assert set(data["fp32_weight_gb_s"]) == {"camelid fp32-eager", "camelid fp32", "transformers fp32"}
    assert data["fp32_weight_gb_s"]["camelid fp32-eager"] > 0
    # the C++ step reads the layers and, greedy, the int8 copy of the head: fewer bytes than every fp32 weight
    from camelid.config import LlamaConfig
    from camelid.ops import native

    cfg = LlamaConfig.from_name("tiny-gqa")
    fp32 = data["medians"]["camelid fp32"]
    assert ("read_gb_per_token" in fp32) == (native.module() is not None)  # the C++ step runs where it is built
    if native.module() is not None:
        head, heads = cfg.vocab_size * cfg.dim, 1 if cfg.tie_embeddings else 2
        want = cfg.num_params() * 4 - heads * head * 4 + cfg.vocab_size * (cfg.dim + 12)
        assert fp32["read_gb_per_token"] * 1e9 == pytest.approx(want, rel=1e-9)


def test_bench_rejects_unknown_engines_in_one_line(tmp_path) -> None:
    for engines, message in [("camelid:int3", "unknown precision 'int3'"), ("vllm:fp32", "unknown engine 'vllm'")]:
        result = runner.invoke(app, ["bench", "--engines", engines, "--out", str(tmp_path)])
        assert result.exit_code != 0
        assert message in str(result.exception)


def test_a_failing_engine_is_reported_and_skipped(tmp_path, monkeypatch) -> None:
    import camelid.cli.bench as bench
    from camelid.errors import CamelidError

    real = bench._run_one

    def flaky(spec: dict) -> dict:
        if spec["engine"] == "transformers":
            raise CamelidError("benchmark of transformers fp32 failed: exit status -11")
        return real(spec)

    monkeypatch.setattr(bench, "_run_one", flaky)
    result = runner.invoke(app, ["bench", "--model", "tiny-gqa", "--prompt-len", "8", "--new-tokens", "2",
                                 "--rounds", "2", "--threads", "1", "--out", str(tmp_path),
                                 "--engines", "camelid:fp32-eager,transformers:fp32"])
    assert result.exit_code == 0, result.output
    assert set(json.loads((tmp_path / "bench.json").read_text())["medians"]) == {"camelid fp32-eager"}


def test_bench_never_writes_over_the_committed_results_by_default(tmp_path, monkeypatch) -> None:
    """Run from the repository root without --out, the results land in runs/bench (ignored by git), not in
    benchmarks/results (the committed ones)."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["bench", "--model", "tiny-gqa", "--prompt-len", "8", "--new-tokens", "2",
                                 "--rounds", "1", "--threads", "1", "--engines", "camelid:fp32-eager"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "bench" / "bench.json").is_file()
    assert not (tmp_path / "benchmarks").exists()
