"""Unbounded work from a model file: a chat template that builds a 10 GB string, doubles one 40 times, loops
10**10 times or asks for range(10**9), and a tokenizer.json whose regex backtracks without bound, each end in one
line that blames the file, with the process alive (`camelid tokenize --chat` in a subprocess)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from reliability_helpers import assert_one_line_error, camelid, camelid_main


def tokenizer_folder(tiny_data: Path, folder: Path, template: str) -> Path:
    """The tiny run's tokenizer.json, with `template` as its chat template (tokenizer_config.json)."""
    folder.mkdir()
    shutil.copyfile(tiny_data / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((tiny_data / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


ATTACKS = {
    "a 10 GB string": ("{{ 'A' * 10**10 }}", "needed more than the 512 MiB"),
    "a string doubled 40 times": ("{% set ns = namespace(s='AB') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                                  "{% endfor %}{{ ns.s | length }}", "needed more than the 512 MiB"),
    "10**10 iterations": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                          "ran for more than 2 s of CPU time"),
    "range(10**9)": ("{% for i in range(10**9) %}{{ i }}{% endfor %}", "Range too big"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_template_that_does_unbounded_work_is_stopped_in_one_line(tiny_data, tmp_path, attack) -> None:
    template, why = ATTACKS[attack]
    folder = tokenizer_folder(tiny_data, tmp_path / "tok", template)
    # the renderer is a process of its own either way; the case as seen also runs the command in a new process
    run = camelid if attack == "a 10 GB string" else camelid_main
    r = run("tokenize", "hello", "--chat", "-m", folder, cwd=tmp_path)
    assert_one_line_error(r, "the chat template", why, "the template (it comes with the model) is at fault")


def test_a_template_that_is_fine_still_renders(tiny_data, tmp_path) -> None:
    folder = tokenizer_folder(tiny_data, tmp_path / "tok", "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                                                           "{% endfor %}")
    r = camelid_main("tokenize", "hello", "--chat", "-m", folder, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == "<user>hello"


def test_a_tokenizer_regex_that_backtracks_without_bound_is_refused(tmp_path) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(\s*a+)+b"), behavior="isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    r = camelid_main("tokenize", "aaaa", "-m", tmp_path / "tokenizer.json", cwd=tmp_path)
    assert_one_line_error(r, "tokenizer.json: a regex of its pre-tokenizer or normalizer backtracks without bound",
                          "fix the pattern")


def test_a_regex_that_backtracks_only_on_rare_text_is_still_one_error_line(tmp_path) -> None:
    """The probes at load time cannot foresee every text: then the command still ends in one `error:` line (after
    the Rust library's own panic message, which camelid cannot silence), not a traceback."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(q(a+)+)+b"), behavior="isolated")  # only after a "q"
    tok.save(str(tmp_path / "tokenizer.json"))
    r = camelid("tokenize", "q" + "a" * 40, "-m", tmp_path / "tokenizer.json", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and "the tokenizer library failed" in errors[0] and "at fault" in errors[0]
