from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from camelid.cli import COMMAND_MODULES, app
from camelid.cli.info import model_sizes
from camelid.config import LlamaConfig

for _m in COMMAND_MODULES:
    __import__(_m)

runner = CliRunner()


def test_info_405b_costs_nothing_and_reports_sizes() -> None:
    result = runner.invoke(app, ["info", "llama3.1-405b", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["params"] == pytest.approx(405.85e9, rel=0.005)
    assert data["weights_bf16_bytes"] == 2 * data["params"]
    # 126 layers x 8 kv heads x 128 dims x (K and V) x 2 bytes
    assert data["kv_cache_bytes_per_token_bf16"] == 126 * 8 * 128 * 2 * 2


def test_info_table_mentions_gqa() -> None:
    result = runner.invoke(app, ["info", "smollm2-135m"])
    assert result.exit_code == 0
    assert "GQA" in result.output and "134,515,008" in result.output


def test_kv_cache_per_token_matches_an_allocated_cache() -> None:
    import torch

    from camelid import Llama

    cfg = LlamaConfig.from_name("tiny-gqa")
    model = Llama(cfg).to(torch.bfloat16)
    model.setup_cache(1, 10)
    allocated = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "kv_cache" in n)
    assert allocated == 10 * model_sizes(cfg)["kv_cache_bytes_per_token_bf16"]


def test_unknown_name_is_one_line_error_from_the_console_script() -> None:
    proc = subprocess.run([sys.executable, "-m", "camelid", "info", "llama-9000b"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: unknown model config 'llama-9000b'; known: llama-7b")
    assert "Traceback" not in proc.stderr


def test_info_kernels_lists_every_op_with_its_implementation_and_reason() -> None:
    from camelid import ops

    result = runner.invoke(app, ["info", "--kernels", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(ops.implementations()) | {"decode step"} == set(data["ops"])
    for row in data["ops"].values():
        assert row["implementation"].startswith(("C++ ", "PyTorch")) and row["reason"]
    table = runner.invoke(app, ["info", "--kernels"])
    assert table.exit_code == 0 and "attention (training)" in table.output and "decode step" in table.output


def test_info_kernels_says_why_when_they_are_switched_off() -> None:
    proc = subprocess.run([sys.executable, "-m", "camelid", "info", "--kernels", "--json"], capture_output=True,
                          text=True, env={**os.environ, "CAMELID_NO_KERNELS": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["ops"]
    gemm = {op: rows.pop(op) for op in list(rows) if op.startswith("GEMM")}  # a library's, kernels or not
    assert len(gemm) == 1 and all(r["implementation"].startswith("PyTorch") and r["reason"] for r in gemm.values())
    assert all(r["implementation"] == "PyTorch" and "CAMELID_NO_KERNELS=1" in r["reason"] for r in rows.values())


def test_info_without_a_name_is_a_one_line_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "camelid", "info"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "--kernels" in proc.stderr
