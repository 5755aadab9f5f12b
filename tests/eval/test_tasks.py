"""camelid.eval.tasks: task files are checked line by line with one-line errors; prompts and k-shot examples
are lm-eval's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lm_eval.api.samplers import FirstNSampler

from camelid import CamelidError
from camelid.eval.tasks import (
    GENERATION,
    MULTIPLE_CHOICE,
    PERPLEXITY,
    MultipleChoice,
    build_context,
    fewshot,
    read_instructions,
    read_multiple_choice,
    resolve_tasks,
)

GOOD = {"question": "Is water wet?", "choices": ["Yes", "No"], "answer": 0}


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("bad,message", [
    ({"question": "q", "choices": ["a", "b"]}, r":2: missing \"answer\""),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, r":2: answer index 2 is out of range for 2 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": -1}, r":2: answer index -1 is out of range"),
    ({"question": "q", "choices": [], "answer": 0}, r":2: \"choices\" must be a non-empty list"),
    ({"question": "q", "choices": ["a", ""], "answer": 0}, r":2: every choice must be a non-empty string"),
    ({"question": "q", "choices": ["a", "b"], "answer": "a"}, r":2: \"answer\" must be the index"),
    ({"choices": ["a", "b"], "answer": 0}, r":2: missing \"question\""),
    ('{"question": "q", "choices": ["a"', r":2: not valid JSON"),
    ("[1, 2]", r":2: a line is a JSON object"),
])
def test_bad_multiple_choice_lines_are_one_line_errors(tmp_path: Path, bad: object, message: str) -> None:
    path = write_jsonl(tmp_path / "mc.jsonl", [GOOD, bad])
    with pytest.raises(CamelidError, match=message) as e:
        read_multiple_choice(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_empty_and_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(CamelidError, match="no examples"):
        read_multiple_choice(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CamelidError, match="cannot read it"):
        read_multiple_choice(tmp_path / "bin.jsonl")
    with pytest.raises(CamelidError, match=r":1: missing \"output\""):
        read_instructions(write_jsonl(tmp_path / "gen.jsonl", [{"instruction": "say hi"}]))


def test_task_kinds_from_names_and_files(tmp_path: Path) -> None:
    tasks = resolve_tasks(["bigbench", "persuasion", "natural_instructions"])
    assert [t.name for t in tasks[:6]] == ["strategyqa", "social_iqa", "winowhy", "sports_understanding",
                                          "date_understanding", "physical_intuition"]
    assert [t.kind for t in tasks] == [MULTIPLE_CHOICE] * 6 + [PERPLEXITY, GENERATION]
    assert all(len(read_multiple_choice(t.path)) > 50 for t in tasks[:6])
    (tmp_path / "notes.txt").write_text("some text")
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"instruction": "i", "input": "x", "output": "y"}])
    mc = write_jsonl(tmp_path / "mc.jsonl", [GOOD])
    assert [t.kind for t in resolve_tasks([str(tmp_path / "notes.txt"), str(gen), str(mc)])] == \
        [PERPLEXITY, GENERATION, MULTIPLE_CHOICE]
    with pytest.raises(CamelidError, match="no such file or task"):
        resolve_tasks(["no_such_task"])
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "x"}])
    with pytest.raises(CamelidError, match="cannot tell the task kind"):
        resolve_tasks([str(odd)])


def test_fewshot_examples_are_lm_evals_first_n_without_the_question_itself() -> None:
    pool = [MultipleChoice(f"q{i}", ("a", "b"), i % 2) for i in range(6)] + [MultipleChoice("q1", ("a", "b"), 1)]
    docs = [ex.__dict__ for ex in pool]
    for k in (0, 1, 3):
        for ex, doc in zip(pool, docs, strict=True):
            want = FirstNSampler(docs).sample(k, eval_doc=doc) if k else []
            assert [s.__dict__ for s in fewshot(pool, ex, k)] == list(want)
    with pytest.raises(CamelidError, match="lower --num-fewshot"):
        fewshot(pool[:3], pool[0], 3)


def test_contexts_raw_and_chat() -> None:
    turns = [("Question: a?\nAnswer:", "yes"), ("Question: b?\nAnswer:", "no")]
    assert build_context(turns, "Question: c?\nAnswer:") == \
        "Question: a?\nAnswer: yes\n\nQuestion: b?\nAnswer: no\n\nQuestion: c?\nAnswer:"
    seen = []
    build_context(turns, "Q", lambda messages: seen.append(messages) or "")
    assert seen == [[{"role": "user", "content": "Question: a?\nAnswer:"}, {"role": "assistant", "content": "yes"},
                     {"role": "user", "content": "Question: b?\nAnswer:"}, {"role": "assistant", "content": "no"},
                     {"role": "user", "content": "Q"}]]
