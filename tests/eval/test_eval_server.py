"""`camelid eval --server`: scoring through a live `camelid serve`'s /v1/completions echo log-probabilities
gives the numbers of `camelid eval` on the same model; perplexity's --limit / --max-tokens bound the text."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import Server, tiny_bpe_llama

import camelid
from camelid import CamelidError
from camelid.eval import Evaluator, Settings, resolve_tasks
from camelid.eval.runner import evaluate
from camelid.eval.server import ServerLLM

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "data" / "austen" / "persuasion.txt").read_text(encoding="utf-8")[30000:36000]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LLaMA (peaked logits) with a 400-token BPE vocabulary, as a Hugging Face folder."""
    return tiny_bpe_llama(tmp_path_factory.mktemp("tiny-eval-server"))


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = Server(tiny_dir, "--quantize", "none", "--slots", "4", "--ctx", "256",
                    log=tmp_path_factory.mktemp("logs") / "serve.log", env={"OMP_NUM_THREADS": "1"})
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tasks")
    quiz = folder / "quiz.jsonl"
    with quiz.open("w") as f:
        for line in (ROOT / "data/multiple_choice/social_iqa.jsonl").read_text().splitlines()[:6]:
            f.write(line + "\n")
    text = folder / "chapter.txt"
    text.write_text(TEXT, encoding="utf-8")
    return quiz, text


def test_server_scores_equal_camelid_eval(tiny_dir: Path, server: str, task_files: tuple[Path, Path]) -> None:
    """Multiple choice (raw and 2-shot through the chat template) and perplexity over several windows: every
    log-likelihood within 1e-4 and the same accuracies."""
    quiz, text = task_files
    local = camelid.load(tiny_dir)
    for settings in (Settings(max_length=96), Settings(num_fewshot=2, chat=True, max_length=200)):
        ours = Evaluator(local, settings, show_progress=False)
        theirs = Evaluator(ServerLLM(server, local.tokenizer), settings, show_progress=False)
        for task in resolve_tasks([str(quiz), str(text)]):
            a, b = ours.run(task), theirs.run(task)
            if task.kind == "multiple_choice":
                for x, y in zip(a["per_example"], b["per_example"], strict=True):
                    assert y["loglikelihoods"] == pytest.approx(x["loglikelihoods"], abs=1e-4)
                assert a["metrics"] == b["metrics"]
            else:
                assert a["tokens"] > 3 * settings.max_length  # several windows
                assert b["loglikelihood"] == pytest.approx(a["loglikelihood"], abs=1e-4 * a["tokens"] ** 0.5)
                assert b["metrics"]["bits_per_byte"] == pytest.approx(a["metrics"]["bits_per_byte"], abs=1e-4)
    # greedy flags: a continuation the server itself generates greedily is greedy on both paths
    ids = local.tokenizer.encode("Anne Elliot was", add_bos=local.tokenizer.add_bos)
    theirs = ServerLLM(server, local.tokenizer)
    cont = local.tokenizer.encode(theirs.generate(ids, max_new_tokens=4))[:3]
    request = camelid.eval.engine.Request(ids, cont)
    got = theirs.score([request], max_length=200)
    want = camelid.eval.engine.loglikelihood(local.model, [request], max_length=200)
    assert got[0][1] == want[0][1] and got[0][0] == pytest.approx(want[0][0], abs=1e-4)


def test_evaluate_with_server_writes_a_server_run(tiny_dir: Path, server: str, task_files: tuple[Path, Path]
                                                  ) -> None:
    quiz, _ = task_files
    report = evaluate([str(tiny_dir)], ["fp32"], resolve_tasks([str(quiz)]), Settings(limit=3), server=server,
                      show_progress=False)
    (run,) = report["runs"]
    assert run["precision"] == "server" and run["server"] == server and run["results"][0]["examples"] == 3
    json.dumps(report)


def test_server_errors_are_one_line(tiny_dir: Path, server: str) -> None:
    tok = camelid.load(tiny_dir).tokenizer
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(CamelidError, match="cannot reach the server") as e:
        ServerLLM(dead, tok)
    assert "\n" not in str(e.value)
    with pytest.raises(CamelidError, match="does not serve 'other'"):
        ServerLLM(server, tok, model="other")
    from camelid.tokenizer import Tokenizer

    with pytest.raises(CamelidError, match="tokenizer differs"):
        ServerLLM(server, Tokenizer.load("llama2-tokenizer"))


def test_perplexity_limit_and_max_tokens_bound_the_text(tiny_dir: Path, tmp_path: Path) -> None:
    """--limit N scores the first N paragraphs, --max-tokens N about the first N tokens: the same numbers as
    the cut text given as a file of its own."""
    llm = camelid.load(tiny_dir)
    whole = tmp_path / "whole.txt"
    whole.write_text(TEXT, encoding="utf-8")
    (task,) = resolve_tasks([str(whole)])
    n_tokens = Evaluator(llm, Settings(), show_progress=False).run(task)["tokens"]

    paragraphs = Evaluator(llm, Settings(limit=3, max_length=64), show_progress=False)
    cut = paragraphs.cut_text(TEXT)
    assert cut.count("\n\n") == 2 and TEXT.startswith(cut) and TEXT[len(cut):].startswith("\n")
    bounded = Evaluator(llm, Settings(max_tokens=150, max_length=64), show_progress=False)
    cut_tokens = bounded.cut_text(TEXT)
    assert TEXT.startswith(cut_tokens) and len(cut_tokens) < len(TEXT)
    for ev, cut_text in ((paragraphs, cut), (bounded, cut_tokens)):
        part = tmp_path / "part.txt"
        part.write_text(cut_text, encoding="utf-8")
        got = ev.run(task)
        want = Evaluator(llm, Settings(max_length=64), show_progress=False).run(resolve_tasks([str(part)])[0])
        assert got["tokens"] == want["tokens"] < n_tokens and got["bytes"] == want["bytes"]
        assert got["metrics"] == want["metrics"]
    assert abs(bounded.run(task)["tokens"] - 150) <= 2
    with pytest.raises(CamelidError, match="max_tokens must be >= 1"):
        Settings(max_tokens=0)
