"""camelid eval against lm-evaluation-harness on the default model (SmolLM2-135M-Instruct), on a few examples
of each task (benchmarks/eval_speed.py compares the whole sets):

- lm-eval's own `hf` backend on camelid's Hugging Face export gives the same acc / acc_norm (to 0.1 point)
  and bits per byte (to 0.001) as `camelid eval`;
- lm-eval's `camelid` model (camelid.eval.harness) gives the same numbers as `camelid eval`, raw and with the
  chat template and k-shot examples; generation too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest

import camelid
import camelid.eval.harness as harness
from camelid.eval import Evaluator, Settings, resolve_tasks
from camelid.eval.tasks import BIGBENCH

pytestmark = pytest.mark.slow
LIMIT = 4


@pytest.fixture(scope="module")
def llm() -> camelid.LLM:
    return camelid.load()


@pytest.fixture(scope="module")
def hf_dir(llm: camelid.LLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llm.save_pretrained(tmp_path_factory.mktemp("smollm2-hf"))


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "excerpt.txt"
    path.write_text((Path(__file__).resolve().parents[2] / "data/austen/persuasion.txt").read_text()[9000:10500])
    return path


def lm_eval_run(model: str, model_args: str, tasks: list[str], **kwargs: object) -> dict:
    return lm_eval_samples(model, model_args, tasks, **kwargs)["results"]


def lm_eval_samples(model: str, model_args: str, tasks: list[str], **kwargs: object) -> dict:
    metadata = kwargs.pop("metadata", None)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, verbosity="ERROR",
                                   task_manager=harness.task_manager(metadata=metadata), **kwargs)


def choice_loglikelihoods(out: dict, task: str) -> list[list[float]]:
    """Per example (in file order), the log-likelihood lm-eval got for each choice."""
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def camelid_run(llm: camelid.LLM, tasks: list[str], **settings: object) -> dict[str, dict]:
    ev = Evaluator(llm, Settings(**settings), show_progress=False)
    return {r["task"]: r for r in (ev.run(t) for t in resolve_tasks(tasks))}


def test_multiple_choice_equals_lm_eval_hf_and_lm_eval_camelid(llm: camelid.LLM, hf_dir: Path) -> None:
    tasks = [f"camelid_{name}" for name in BIGBENCH]
    hf_out = lm_eval_samples("hf", f"pretrained={hf_dir},dtype=float32,device=cpu", tasks, limit=LIMIT,
                             batch_size=8)
    ours_in_lm_eval_out = lm_eval_samples("camelid", "pretrained=smollm2-135m-instruct", tasks, limit=LIMIT)
    hf, ours_in_lm_eval = hf_out["results"], ours_in_lm_eval_out["results"]
    ours = camelid_run(llm, list(BIGBENCH), limit=LIMIT)
    for name in BIGBENCH:
        for metric in ("acc", "acc_norm"):
            value = ours[name]["metrics"][metric]
            assert value == pytest.approx(hf[f"camelid_{name}"][f"{metric},none"], abs=1e-3), (name, metric)
            assert value == pytest.approx(ours_in_lm_eval[f"camelid_{name}"][f"{metric},none"], abs=1e-12)
        # every choice's log-likelihood, not only which choice wins
        mine = [e["loglikelihoods"] for e in ours[name]["per_example"]]
        theirs = choice_loglikelihoods(hf_out, f"camelid_{name}")
        assert len(mine) == len(theirs) == LIMIT
        for a, b in zip(mine, theirs, strict=True):
            assert a == pytest.approx(b, abs=2e-3, rel=1e-4), name
        for a, b in zip(mine, choice_loglikelihoods(ours_in_lm_eval_out, f"camelid_{name}"), strict=True):
            assert a == pytest.approx(b, abs=1e-4), name  # the same engine; other batches round differently


def test_chat_template_and_fewshot_equal_lm_eval(llm: camelid.LLM, hf_dir: Path) -> None:
    names = ["social_iqa"]
    tasks = [f"camelid_{n}" for n in names]
    kwargs = dict(limit=3, num_fewshot=2, apply_chat_template=True, fewshot_as_multiturn=True)
    hf = lm_eval_run("hf", f"pretrained={hf_dir},dtype=float32,device=cpu", tasks, batch_size=8, **kwargs)
    ours_in_lm_eval = lm_eval_run("camelid", "pretrained=smollm2-135m-instruct", tasks, **kwargs)
    ours = camelid_run(llm, names, limit=3, num_fewshot=2, chat=True)
    for name in names:
        for metric in ("acc", "acc_norm"):
            value = ours[name]["metrics"][metric]
            assert value == pytest.approx(hf[f"camelid_{name}"][f"{metric},none"], abs=1e-3), (name, metric)
            assert value == pytest.approx(ours_in_lm_eval[f"camelid_{name}"][f"{metric},none"], abs=1e-12)


def test_bits_per_byte_equals_lm_eval(llm: camelid.LLM, hf_dir: Path, excerpt: Path) -> None:
    """Windows of 96 tokens over ~350 tokens of held-out text: every token scored once, as lm-eval does."""
    meta = {"path": str(excerpt)}
    hf = lm_eval_run("hf", f"pretrained={hf_dir},dtype=float32,device=cpu,max_length=96", ["camelid_persuasion"],
                     batch_size=4, metadata=meta)["camelid_persuasion"]
    ours_in_lm_eval = lm_eval_run("camelid", "pretrained=smollm2-135m-instruct,max_length=96",
                                  ["camelid_persuasion"], metadata=meta)["camelid_persuasion"]
    ours = camelid_run(llm, [str(excerpt)], max_length=96)["excerpt"]
    assert ours["tokens"] > 3 * 96  # several windows
    bpb = ours["metrics"]["bits_per_byte"]
    assert bpb == pytest.approx(hf["bits_per_byte,none"], abs=1e-3)
    assert bpb == pytest.approx(ours_in_lm_eval["bits_per_byte,none"], abs=1e-9)
    assert ours["metrics"]["word_perplexity"] == pytest.approx(hf["word_perplexity,none"], rel=1e-3)


def test_generation_equals_lm_eval_camelid(llm: camelid.LLM) -> None:
    ours = camelid_run(llm, ["natural_instructions"], limit=2, max_new_tokens=8)["natural_instructions"]
    theirs = lm_eval_run("camelid", "pretrained=smollm2-135m-instruct", ["camelid_natural_instructions"], limit=2,
                         gen_kwargs="max_gen_toks=8")["camelid_natural_instructions"]
    assert ours["metrics"]["exact_match"] == theirs["exact_match,none"]
    assert ours["metrics"]["rouge_l"] == pytest.approx(theirs["rouge_l,none"], abs=1e-12)


def test_lm_eval_command_line_runs_the_camelid_model(llm: camelid.LLM, tmp_path: Path) -> None:
    """`python -m camelid.eval.harness --model camelid ...`: lm-eval's own command line, the model registered
    and camelid's tasks on its path; its results file holds the numbers `camelid eval` gives."""
    r = subprocess.run([sys.executable, "-m", "camelid.eval.harness", "run", "--model", "camelid",
                        "--model_args", "pretrained=smollm2-135m-instruct", "--tasks", "camelid_physical_intuition",
                        "--limit", "3", "--output_path", str(tmp_path)], capture_output=True, text=True,
                       timeout=900, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "camelid_physical_intuition" in r.stdout
    (results,) = tmp_path.rglob("results*.json")
    theirs = json.loads(results.read_text())["results"]["camelid_physical_intuition"]
    ours = camelid_run(llm, ["physical_intuition"], limit=3)["physical_intuition"]["metrics"]
    assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-12)
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-12)
