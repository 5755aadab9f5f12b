"""Datasets and prompts of camelid's lm-eval tasks, read by camelid itself (the same files, checks and prompt
text as `camelid eval`). Each task's `dataset_kwargs` name a built-in task; `--metadata '{"path": FILE}'`
points a task at another file of the same kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from camelid.eval import metrics, tasks


def _path(name: str, path: str | None) -> Path:
    if path:
        return Path(path)
    (task,) = tasks.resolve_tasks([name])
    return task.path


def multiple_choice(name: str = "", path: str | None = None, **_: Any) -> datasets.DatasetDict:
    rows = [{"question": e.question, "choices": list(e.choices), "answer": e.answer}
            for e in tasks.read_multiple_choice(_path(name, path))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def text_document(name: str = "", path: str | None = None, **_: Any) -> datasets.DatasetDict:
    text = tasks.read_text(_path(name, path))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": text}])})


def instructions(name: str = "", path: str | None = None, split: str | None = None, **_: Any
                 ) -> datasets.DatasetDict:
    rows = [e.__dict__ for e in tasks.read_instructions(_path(name, path)) if split is None or e.split == split]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def question_text(doc: dict[str, Any]) -> str:
    return tasks.question_text(tasks.MultipleChoice(doc["question"], tuple(doc["choices"]), doc["answer"]))


def instruction_text(doc: dict[str, Any]) -> str:
    return tasks.instruction_text(tasks.Instruction(doc["instruction"], doc["input"], doc["output"]))


def generation_metrics(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    (prediction,) = results
    return {"exact_match": metrics.exact_match(prediction, doc["output"]),
            "rouge_l": metrics.rouge_l(prediction, doc["output"])}
