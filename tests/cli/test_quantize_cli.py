"""`camelid quantize` end to end: a Hugging Face folder in, a safetensors checkpoint out, loaded back alone."""

from __future__ import annotations

import shutil
import subprocess
import sys

import torch

import camelid
from camelid.config import LlamaConfig
from camelid.generate import generate
from camelid.interop.hf import load_hf_dir, save_hf_dir
from camelid.model import Llama
from camelid.variants.quantized import load_quantized, quantize_model


def test_quantize_cli_writes_a_checkpoint_equal_to_in_memory_quantisation(tmp_path) -> None:
    model = Llama(LlamaConfig.from_name("tiny-gqa", tie_embeddings=True)).eval()
    save_hf_dir(model, tmp_path / "hf")
    out = tmp_path / "q4.safetensors"
    proc = subprocess.run([sys.executable, "-m", "camelid", "quantize", str(tmp_path / "hf"), str(out),
                           "--mode", "int4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "int4" in proc.stdout and "the source has no tokenizer" in proc.stdout and out.is_file()
    _, fresh = load_hf_dir(tmp_path / "hf")
    want = quantize_model(fresh.eval(), "int4")
    got = load_quantized(out)
    ids = torch.tensor([[1, 7, 3, 99, 4]])
    assert torch.equal(got(ids), want(ids))
    assert generate(got, [1, 7, 3], 10) == generate(want, [1, 7, 3], 10)


def test_quantize_cli_errors_are_one_line(tmp_path) -> None:
    for args, message in [
        ([str(tmp_path / "missing"), str(tmp_path / "q.safetensors")], "no such file or directory"),
        ([str(tmp_path), str(tmp_path / "q.safetensors"), "--mode", "int3"], "unknown --mode 'int3'"),
        ([str(tmp_path), str(tmp_path / "q.bin")], "must be a .safetensors file"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "camelid", "quantize", *args], capture_output=True, text=True)
        assert proc.returncode == 1
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_the_tokenizer_is_written_beside_the_file_and_generate_runs_it(tiny_llama_dir, tmp_path) -> None:
    out = tmp_path / "q" / "tiny-int8.safetensors"
    proc = subprocess.run([sys.executable, "-m", "camelid", "quantize", str(tiny_llama_dir), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"its tokenizer beside it in {out.parent}" in proc.stdout
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.parent.iterdir()}
    text = "the cue word is here"
    quantized, source = camelid.load(out), camelid.load(tiny_llama_dir)
    assert quantized.tokenizer.encode(text) == source.tokenizer.encode(text)
    gen = subprocess.run([sys.executable, "-m", "camelid", "generate", "-m", str(out), text, "-n", "4", "-q"],
                         capture_output=True, text=True)
    assert gen.returncode == 0 and gen.stderr == "", gen.stderr
    assert gen.stdout == quantized.generate(text, max_new_tokens=4) + "\n"
    # quantising again into the same folder: the tokenizer there is this one, so it is kept
    again = subprocess.run([sys.executable, "-m", "camelid", "quantize", str(tiny_llama_dir),
                            str(out.parent / "tiny-int4.safetensors"), "--mode", "int4"],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "its tokenizer is the one already in" in again.stdout, again.stderr


def test_a_folder_holding_another_tokenizer_is_refused_before_quantising(tiny_llama_dir, small_tokenizer,
                                                                        tmp_path) -> None:
    (tmp_path / "shared").mkdir()
    shutil.copy(small_tokenizer, tmp_path / "shared" / "tokenizer.json")
    out = tmp_path / "shared" / "q.safetensors"
    proc = subprocess.run([sys.executable, "-m", "camelid", "quantize", str(tiny_llama_dir), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "already holds another model's tokenizer.json" in proc.stderr and "a folder of its own" in proc.stderr
    assert not out.exists()
