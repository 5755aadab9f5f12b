"""Bad input a careless user gives: one line on stderr naming the file (or stream) and the problem, exit status 1,
never a traceback; what should only be warned about is warned about, once per file. (`camelid` in a subprocess.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from reliability_helpers import TINY_RUN, assert_one_line_error, camelid, camelid_main, settings

from camelid import Llama, LlamaConfig
from camelid.interop.hf import save_hf_dir

NOT_UTF8 = b"The capital of France is \xff\xfe\n"


def test_stdin_that_is_not_utf8_for_generate(tmp_path) -> None:
    r = camelid("generate", "-", "-n", "2", cwd=tmp_path, stdin=NOT_UTF8)
    assert_one_line_error(r, "stdin: not UTF-8 text", "\\xff")


def test_stdin_that_is_not_utf8_for_chat(tiny_llama_dir, tmp_path) -> None:
    r = camelid("chat", "-m", tiny_llama_dir, "-n", "2", "--quantize", "none", cwd=tmp_path, stdin=NOT_UTF8)
    assert_one_line_error(r, "stdin: not UTF-8 text", others=("camelid: loaded", "commands:"))


def test_an_argument_that_is_not_utf8(tmp_path) -> None:
    r = camelid("tokenize", os.fsdecode(b"caf\xe9"), cwd=tmp_path)
    assert_one_line_error(r, "argument 2", "not UTF-8 text")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    save_hf_dir(Llama(LlamaConfig.from_name("tiny-gqa")), folder)
    return folder


def edited_copy(model_folder: Path, tmp_path: Path, config: bytes) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(model_folder / "model.safetensors")
    (folder / "config.json").write_bytes(config)
    return folder


def config_with(model_folder: Path, **change: object) -> bytes:
    return json.dumps({**json.loads((model_folder / "config.json").read_text()), **change}).encode()


@pytest.mark.parametrize("config, message", [
    (lambda m: "{\"hidden_size\": 64, \"model_type\": \"llama\", \"name\": \"caf\xe9\"}".encode("latin-1"),
     "config.json: not UTF-8 text"),
    (lambda m: b"[1, 2, 3]", "config.json: holds a JSON list, not an object"),
    (lambda m: config_with(m, vocab_size="lots"), "vocab_size"),
    (lambda m: config_with(m, hidden_size=-64), "hidden_size"),
    (lambda m: config_with(m, num_hidden_layers=1_000_000), "num_hidden_layers"),
    (lambda m: config_with(m, rope_theta=0), "rope_theta"),
    (lambda m: config_with(m, max_position_embeddings=0), "max_position_embeddings"),
    (lambda m: config_with(m, num_attention_heads=5), "num_attention_heads"),
], ids=["not-utf8", "a-list", "vocab-lots", "negative-hidden", "a-million-layers", "rope-theta-0",
        "no-positions", "heads-not-dividing"])
def test_a_bad_config_json_names_the_field_and_the_file(model_folder, tmp_path, config, message, request) -> None:
    folder = edited_copy(model_folder, tmp_path, config(model_folder))
    args = ("generate", "hello", "-m", folder, "-n", "1", "--quantize", "none")
    # the case as seen runs the command in a process of its own; the others its entry point, here
    run = camelid if request.node.callspec.id == "a-million-layers" else camelid_main
    r = run(*args, cwd=tmp_path)
    assert_one_line_error(r, str(folder / "config.json"), message)


def test_a_negative_model_dimension_from_the_command_line(tiny_data, tmp_path) -> None:
    r = camelid_main("pretrain", *settings(*TINY_RUN, f"data={tiny_data}", "out=out", "model.dim=-64"),
                     cwd=tmp_path)
    assert_one_line_error(r, "dim", "-64")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_out_that_is_a_file(tiny_data, tmp_path) -> None:
    (tmp_path / "taken").write_text("not a folder\n")
    (tmp_path / "emma.txt").write_text("Emma Woodhouse, handsome, clever, and rich.\n" * 50)
    r = camelid("prepare", "emma.txt", "-t", tiny_data, "--out", "taken", cwd=tmp_path)  # the case as seen
    assert_one_line_error(r, "taken: an existing file, not a folder", "--out")
    r = camelid_main("prepare", "emma.txt", "-t", tiny_data, "--out", "taken/data", cwd=tmp_path)
    assert_one_line_error(r, "taken: an existing file, not a folder")
    r = camelid_main("tokenizer", "train", "emma.txt", "--vocab-size", "300", "--out", "taken", cwd=tmp_path)
    assert_one_line_error(r, "taken: an existing file, not a folder")
    assert (tmp_path / "taken").read_text() == "not a folder\n"  # untouched


def test_an_empty_corpus_is_refused_and_a_binary_file_warned_about(tiny_data, tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("\n \n")
    r = camelid("prepare", "empty.txt", "-t", tiny_data, "--out", "data", cwd=tmp_path)  # the case as seen
    assert_one_line_error(r, "empty.txt: empty", "no text")
    assert not (tmp_path / "data" / "meta.json").exists()
    r = camelid_main("tokenizer", "train", "empty.txt", "--vocab-size", "300", "--out", "tok", cwd=tmp_path)
    assert_one_line_error(r, "empty.txt: empty", "no text")
    assert not (tmp_path / "tok" / "tokenizer.json").exists()

    (tmp_path / "emma.txt").write_text("Emma Woodhouse, handsome, clever, and rich, with a comfortable home.\n" * 80)
    (tmp_path / "photo.txt").write_bytes(bytes(range(256)) * 64)
    for args in (("prepare", "emma.txt", "photo.txt", "empty.txt", "-t", tiny_data, "--out", "data", "--workers", "1"),
                 ("tokenizer", "train", "emma.txt", "photo.txt", "empty.txt", "--vocab-size", "300", "--out", "tok")):
        r = camelid_main(*args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        warnings = [line for line in r.stderr.splitlines() if line.startswith("camelid: warning:")]
        assert len(warnings) == 2 and "Traceback" not in r.stderr, r.stderr
        assert "photo.txt: it holds NUL bytes: a binary file" in warnings[0]
        assert "empty.txt: empty" in warnings[1]


def test_a_local_link_loop_is_never_sent_to_the_hub(tmp_path) -> None:
    (tmp_path / "org").mkdir()
    os.symlink("loop", tmp_path / "org" / "loop")  # org/loop looks like a Hub id; it is a local path
    r = camelid("generate", "hello", "-m", "org/loop", "-n", "1", cwd=tmp_path,
                env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})  # a Hub that cannot answer
    line = assert_one_line_error(r, "org/loop: a link that cannot be resolved")
    assert "Hugging Face" not in line
