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


def test_meta_shards_must_divide_the_heads_and_the_error_names_the_counts_that_do(tmp_path: Path) -> None:
    save_hf_dir(Llama(LlamaConfig.from_name("tiny-gqa")), tmp_path / "hf")  # 4 query heads, 2 key/value heads
    proc = subprocess.run([sys.executable, "-m", "camelid", "convert", str(tmp_path / "hf"), str(tmp_path / "meta"),
                           "--to", "meta", "--shards", "4"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"--shards 4: {tmp_path / 'hf'} has 4 query and 2 key/value heads" in proc.stderr
    assert "choose 1 or 2" in proc.stderr and not (tmp_path / "meta").exists()


def test_meta_output_carries_the_tokenizer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A source without Meta's tokenizer.model (here a tokenizer.json; a GGUF's vocabulary alike) gets its
    tokenizer written as tokenizer.json beside params.json, so `camelid generate -m` runs the folder."""
    result = runner.invoke(app, ["convert", str(tiny_llama_dir), str(tmp_path / "meta"), "--to", "meta"])
    assert result.exit_code == 0, result.output
    src, meta = camelid.load(tiny_llama_dir), camelid.load(tmp_path / "meta")
    assert meta.tokenizer is not None
    text = "the cue word is here"
    assert meta.tokenizer.encode(text) == src.tokenizer.encode(text)
    assert meta.generate(text, max_new_tokens=6) == src.generate(text, max_new_tokens=6)


@pytest.mark.slow
def test_the_default_model_converts_to_meta_as_documented(tmp_path: Path) -> None:
    """README: `camelid convert smollm2-135m-instruct out/meta --to meta --shards 3`. SmolLM2 has 9 query and 3
    key/value heads, so 2 shards is refused with the counts that work; the 3-shard folder answers like the GGUF."""
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "camelid", *args], capture_output=True, text=True, cwd=tmp_path)

    bad = cli("convert", "smollm2-135m-instruct", "out/meta", "--to", "meta", "--shards", "2")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "choose 1 or 3" in bad.stderr, bad.stderr
    ok = cli("convert", "smollm2-135m-instruct", "out/meta", "--to", "meta", "--shards", "3")
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "out/meta").glob("consolidated.*.pth")) == [
        "consolidated.00.pth", "consolidated.01.pth", "consolidated.02.pth"]
    prompt = "The capital of France is"
    run = cli("generate", "-m", "out/meta", prompt, "-n", "8", "-q", "--quantize", "none")
    assert run.returncode == 0, run.stderr
    assert run.stdout == camelid.load("smollm2-135m-instruct").generate(prompt, max_new_tokens=8) + "\n"
