"""`camelid quantize` end to end: a Hugging Face folder in, a safetensors checkpoint out, loaded back alone."""

from __future__ import annotations

import subprocess
import sys

import torch

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
    assert "int4" in proc.stdout and out.is_file()
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
