"""`camelid convert`: every format to every other, weights unchanged; bad requests get one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import camelid
from camelid import Llama, LlamaConfig
from camelid.cli import COMMAND_MODULES, app
from camelid.interop.hf import save_hf_dir

for _m in COMMAND_MODULES:
    __import__(_m)

runner = CliRunner()


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return camelid.load(path, tokenizer=False).model(ids)


def test_hf_to_gguf_to_meta_to_hf_keeps_the_model(tmp_path: Path) -> None:
    cfg = LlamaConfig.from_name("tiny-gqa")
    model = Llama(cfg).eval()
    save_hf_dir(model, tmp_path / "hf")
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        want = model(ids)
    steps = [("hf", "m.gguf", ["--to", "gguf"]), ("m.gguf", "meta", ["--to", "meta", "--shards", "2"]),
             ("meta", "hf2", ["--to", "hf"])]
    for src, dst, opts in steps:
        result = runner.invoke(app, ["convert", str(tmp_path / src), str(tmp_path / dst), *opts])
        assert result.exit_code == 0, result.output
        torch.testing.assert_close(_logits(tmp_path / dst, ids), want, atol=0, rtol=0)
    assert (tmp_path / "meta" / "consolidated.01.pth").is_file()


def test_dtype_and_qtype(tmp_path: Path) -> None:
    save_hf_dir(Llama(LlamaConfig.from_name("tiny-mqa")), tmp_path / "hf")
    result = runner.invoke(app, ["convert", str(tmp_path / "hf"), str(tmp_path / "bf"), "--to", "hf",
                                 "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert camelid.load(tmp_path / "bf", tokenizer=False).model.norm.weight.dtype == torch.bfloat16
    result = runner.invoke(app, ["convert", str(tmp_path / "hf"), str(tmp_path / "q.gguf"), "--to", "gguf",
                                 "--qtype", "q8_0"])
    assert result.exit_code == 0, result.output
    import gguf

    assert "Q8_0" in {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}


def test_bad_requests_are_one_line_errors(tmp_path: Path) -> None:
    save_hf_dir(Llama(LlamaConfig.from_name("tiny-gqa")), tmp_path / "hf")
    cases = [
        (["--to", "gguf"], "out.bin", "must be a file ending in .gguf"),
        (["--to", "gguf", "--qtype", "q2"], "out.gguf", "unknown GGUF type 'q2'"),
        (["--to", "hf", "--dtype", "f8"], "out", "unknown --dtype 'f8'"),
    ]
    for opts, dst, message in cases:
        proc = subprocess.run([sys.executable, "-m", "camelid", "convert", str(tmp_path / "hf"), str(tmp_path / dst),
                               *opts], capture_output=True, text=True)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.mark.slow
def test_real_gguf_to_q8_0_keeps_the_vocabulary(smollm2_gguf: Path, tmp_path: Path) -> None:
    from camelid.interop.gguf import read_metadata

    out = tmp_path / "smollm2-q8_0.gguf"
    proc = subprocess.run([sys.executable, "-m", "camelid", "convert", str(smollm2_gguf), str(out), "--to", "gguf",
                           "--qtype", "q8_0"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr
    src, ours = read_metadata(smollm2_gguf), read_metadata(out)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert ours[key] == src[key], key
    assert ours["general.file_type"] == 7  # llama.cpp's MOSTLY_Q8_0
