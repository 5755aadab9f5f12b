"""Evaluation tasks from local files: multiple choice, perplexity of text, and generation.

- Multiple choice: jsonl of {"question": str, "choices": [str, ...], "answer": int} (answer indexes choices).
- Perplexity: a UTF-8 text file, scored whole (bits per byte, perplexity per token).
- Generation: jsonl (optionally .gz) of {"instruction", "input", "output"[, "task", "split"]}, scored by exact
  match and ROUGE-L against "output".

Prompts follow lm-evaluation-harness, so that the same task run there gives the same numbers (see
camelid/eval/lm_eval_tasks): a question reads "Question: <question>\\nAnswer:" and each choice is scored as
" <choice>"; k-shot examples come first, each with its answer, separated by blank lines (lm-eval's
fewshot_delimiter); the shots are the first k other examples of the same file (lm-eval's first_n sampler).
With the chat template each shot is a user turn and an assistant turn, and the choice follows the
assistant header directly (lm-eval's --apply_chat_template --fewshot_as_multiturn).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError

MULTIPLE_CHOICE, PERPLEXITY, GENERATION = "multiple_choice", "perplexity", "generation"
KINDS = (MULTIPLE_CHOICE, PERPLEXITY, GENERATION)

BIGBENCH = ("strategyqa", "social_iqa", "winowhy", "sports_understanding", "date_understanding",
            "physical_intuition")
BUILTIN: dict[str, tuple[str, str]] = {  # name -> (kind, path under the data folder)
    **{name: (MULTIPLE_CHOICE, f"multiple_choice/{name}.jsonl") for name in BIGBENCH},
    "persuasion": (PERPLEXITY, "austen/persuasion.txt"),
    "natural_instructions": (GENERATION, "chat/natural_instructions.jsonl.gz"),
}
GROUPS = {"bigbench": BIGBENCH}


@dataclass(frozen=True)
class MultipleChoice:
    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Instruction:
    instruction: str
    input: str
    output: str
    task: str = ""
    split: str = ""


@dataclass(frozen=True)
class Task:
    """One evaluation task: its name, kind and file (`split` picks generation examples by their split)."""

    name: str
    kind: str
    path: Path
    split: str | None = None


def data_dir() -> Path:
    """The data folder of built-in tasks: $CAMELID_DATA_DIR, else data/ beside the camelid package."""
    env = os.environ.get("CAMELID_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def resolve_tasks(specs: list[str]) -> list[Task]:
    """Task names (`bigbench`, `strategyqa`, `persuasion`, ...) or file paths -> tasks. A path's kind is read
    from its contents: .txt is perplexity, jsonl with "choices" is multiple choice, with "output" generation."""
    tasks: list[Task] = []
    for spec in specs:
        for name in GROUPS.get(spec, (spec,)):
            if name in BUILTIN:
                kind, rel = BUILTIN[name]
                path = data_dir() / rel
                if not path.is_file():
                    raise CamelidError(f"task {name}: {path} is missing; built-in tasks read the repository's data/ "
                                       "folder (or $CAMELID_DATA_DIR); pass a file path instead")
                tasks.append(Task(name, kind, path, "test" if kind == GENERATION else None))
            else:
                path = Path(name)
                if not path.is_file():
                    known = ", ".join([*GROUPS, *BUILTIN])
                    raise CamelidError(f"task {name!r}: no such file or task; give a .txt or .jsonl file "
                                       f"or one of {known}")
                tasks.append(Task(_stem(path), guess_kind(path), path))
    return tasks


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json", ".txt"):
        name = name.removesuffix(suffix)
    return name


def _open_text(path: Path) -> Any:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def guess_kind(path: Path) -> str:
    if path.suffix in (".txt", ".md"):
        return PERPLEXITY
    for _, record in _records(path, "a task file"):
        if isinstance(record, dict) and "choices" in record:
            return MULTIPLE_CHOICE
        if isinstance(record, dict) and "output" in record:
            return GENERATION
        break
    raise CamelidError(f"{path}: cannot tell the task kind; multiple-choice lines have \"choices\", generation "
                       "lines \"output\", and a .txt file is scored for perplexity")


def _records(path: Path, what: str) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each non-blank line; a bad line is a one-line error naming its number."""
    fix = f"each line of {what} must be one JSON object"
    try:
        with _open_text(path) as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise CamelidError(f"{path}:{n}: not valid JSON ({e.msg}); {fix}") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise CamelidError(f"{path}: cannot read it ({e}); give a UTF-8 jsonl file") from None


def read_multiple_choice(path: Path) -> list[MultipleChoice]:
    fix = 'expected {"question": str, "choices": [str, ...], "answer": int}'
    out = []
    for n, r in _records(path, "a multiple-choice file"):
        where = f"{path}:{n}"
        if not isinstance(r, dict):
            raise CamelidError(f"{where}: a line is a JSON object; {fix}")
        for key in ("question", "choices", "answer"):
            if key not in r:
                raise CamelidError(f"{where}: missing \"{key}\"; {fix}")
        question, choices, answer = r["question"], r["choices"], r["answer"]
        if not isinstance(question, str):
            raise CamelidError(f"{where}: \"question\" must be a string; {fix}")
        if not isinstance(choices, list) or not choices:
            raise CamelidError(f"{where}: \"choices\" must be a non-empty list of strings; {fix}")
        if not all(isinstance(c, str) and c for c in choices):
            raise CamelidError(f"{where}: every choice must be a non-empty string; {fix}")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise CamelidError(f"{where}: \"answer\" must be the index of the right choice (an int), "
                               f"got {answer!r}; {fix}")
        if not 0 <= answer < len(choices):
            raise CamelidError(f"{where}: answer index {answer} is out of range for {len(choices)} choices "
                               "(it counts from 0)")
        out.append(MultipleChoice(question, tuple(choices), answer))
    if not out:
        raise CamelidError(f"{path}: no examples; {fix}, one per line")
    return out


def read_instructions(path: Path, split: str | None = None) -> list[Instruction]:
    fix = 'expected {"instruction": str, "input": str, "output": str}'
    out = []
    for n, r in _records(path, "a generation file"):
        where = f"{path}:{n}"
        if not isinstance(r, dict):
            raise CamelidError(f"{where}: a line is a JSON object; {fix}")
        if "output" not in r:
            raise CamelidError(f"{where}: missing \"output\" (the reference answer); {fix}")
        if "instruction" not in r and "input" not in r:
            raise CamelidError(f"{where}: missing \"instruction\" and \"input\" (the prompt); {fix}")
        fields = {k: r.get(k, "") for k in ("instruction", "input", "output", "task", "split")}
        bad = [k for k, v in fields.items() if not isinstance(v, str)]
        if bad:
            raise CamelidError(f"{where}: \"{bad[0]}\" must be a string; {fix}")
        out.append(Instruction(**fields))
    if not out:
        raise CamelidError(f"{path}: no examples; {fix}, one per line")
    return out


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CamelidError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    if not text:
        raise CamelidError(f"{path}: the file is empty; perplexity needs some text")
    return text


# ---- prompts ----------------------------------------------------------------------------------------------

FEWSHOT_DELIMITER = "\n\n"  # between k-shot examples (lm-eval's default)
TARGET_DELIMITER = " "  # between a question and its answer (lm-eval's default; "" after a chat header)


def question_text(ex: MultipleChoice) -> str:
    return f"Question: {ex.question.strip()}\nAnswer:"


def instruction_text(ex: Instruction) -> str:
    parts = [p.strip() for p in (ex.instruction, ex.input) if p.strip()]
    return "\n\n".join(parts) + "\nOutput:"


def fewshot(pool: list[Any], example: Any, k: int) -> list[Any]:
    """The first k examples of `pool` other than `example` itself (lm-eval's first_n sampler)."""
    if k <= 0:
        return []
    shots = [p for p in pool[: k + 1] if p != example][:k]
    if len(shots) < k:
        shots = [p for p in pool if p != example][:k]
    if len(shots) < k:
        raise CamelidError(f"{k}-shot prompts need {k} other examples, but the pool has {len(shots)}; "
                           "lower --num-fewshot")
    return shots


def build_context(turns: list[tuple[str, str]], question: str, chat_template: Any = None) -> str:
    """The prompt before the answer: k-shot (question, answer) turns, then the question.

    Raw text: "q1 a1\\n\\nq2 a2\\n\\nq" (the answer follows after TARGET_DELIMITER). With
    `chat_template(messages)` (e.g. Tokenizer.apply_chat_template) every shot is a user and an assistant
    message and the prompt ends with the assistant's header."""
    if chat_template is None:
        return "".join(f"{q}{TARGET_DELIMITER}{a}{FEWSHOT_DELIMITER}" for q, a in turns) + question
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    return chat_template([*messages, {"role": "user", "content": question}])
