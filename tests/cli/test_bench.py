from __future__ import annotations

import json

from typer.testing import CliRunner

from camelid.cli import COMMAND_MODULES, app

for _m in COMMAND_MODULES:
    __import__(_m)

runner = CliRunner()


def test_bench_tiny_writes_json_and_chart(tmp_path) -> None:
    result = runner.invoke(app, ["bench", "--model", "tiny-gqa", "--prompt-len", "16", "--new-tokens", "4",
                                 "--rounds", "1", "--threads", "1", "--out", str(tmp_path),
                                 "--engines", "camelid:fp32-eager,camelid:int8,transformers:fp32"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert set(data["medians"]) == {"camelid fp32-eager", "camelid int8", "transformers fp32"}
    for row in data["medians"].values():
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["peak_rss_mib"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0
    # the memory read bandwidth of the run, and what the fp32 engine's decode streams of it
    assert data["read_bandwidth_gb_s"]["median"] > 0 and len(data["read_bandwidth_gb_s"]["rounds"]) == 1
    assert set(data["fp32_weight_gb_s"]) == {"camelid fp32-eager", "transformers fp32"}
    assert data["fp32_weight_gb_s"]["camelid fp32-eager"] > 0


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
