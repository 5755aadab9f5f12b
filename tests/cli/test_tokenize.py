from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from camelid.cli import COMMAND_MODULES, app
from camelid.tokenizer import Tokenizer

for _m in COMMAND_MODULES:
    __import__(_m)

runner = CliRunner()


def test_tokenize_json_and_chat(smollm2_gguf) -> None:
    tok = Tokenizer.from_gguf(smollm2_gguf)
    result = runner.invoke(app, ["tokenize", "Hi 😀 123", "--model", str(smollm2_gguf), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ids"] == tok.encode("Hi 😀 123") and data["pieces"][0] == "Hi"
    result = runner.invoke(app, ["tokenize", "Hello", "--model", str(smollm2_gguf), "--chat", "--system", "Be brief.",
                                 "--json"])
    data = json.loads(result.output)
    assert data["text"] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n" \
                           "<|im_start|>assistant\n"
    assert data["ids"].count(tok.id_of("<|im_start|>")) == 3 and sum(data["special"]) == 5  # 3 starts, 2 ends


def test_tokenize_table_and_errors(smollm2_gguf, tmp_path) -> None:
    result = runner.invoke(app, ["tokenize", "camelid", "--model", str(smollm2_gguf)])
    assert result.exit_code == 0 and "tokens" in result.output
    proc = subprocess.run([sys.executable, "-m", "camelid", "tokenize", "x", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
