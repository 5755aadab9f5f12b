"""camelid inside lm-evaluation-harness: the `camelid` model class and camelid's offline task YAMLs.

lm-eval finds models by name in its own registry, which a third-party package can only join by being
imported. So run lm-eval through this module, which registers the model, adds camelid's tasks
(camelid/eval/lm_eval_tasks: camelid_bigbench, camelid_<set>, camelid_persuasion,
camelid_natural_instructions) to the task path, and hands the command line to lm-eval unchanged:

    python -m camelid.eval.harness --model camelid --model_args pretrained=smollm2-135m-instruct,quantize=int8 \\
        --tasks camelid_bigbench --num_fewshot 0

From Python, `import camelid.eval.harness` before `lm_eval.simple_evaluate(model="camelid", ...)`, with
`task_manager=camelid.eval.harness.task_manager()` for the camelid tasks.

Model arguments: pretrained (anything camelid.load takes: a name, a Hugging Face folder, a .gguf file, a Meta
folder; default smollm2-135m-instruct), quantize (int8 | int4 | fp32), max_length, batch_tokens,
max_gen_toks, threads. Requests are scored by camelid.eval.engine, which computes every shared prefix once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own models register on import; after us they would not
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

import camelid
from camelid.eval import engine
from camelid.eval.runner import Evaluator, Settings

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"


@register_model("camelid")
class CamelidLM(TemplateLM):
    """An lm-eval model backed by `camelid.load`; scoring and generation are camelid.eval.Evaluator's, the
    same code `camelid eval` runs."""

    def __init__(self, pretrained: str = "smollm2-135m-instruct", quantize: str | None = None,
                 max_length: int | None = None, batch_tokens: int = 1024, max_gen_toks: int = 256,
                 threads: int | None = None, **_lm_eval_options: Any) -> None:
        # lm-eval also passes batch_size, max_batch_size and device: camelid sizes batches in tokens (batch_tokens)
        super().__init__()
        if threads:
            torch.set_num_threads(int(threads))
        quantize = None if quantize in (None, "", "none") else str(quantize)
        self.llm = camelid.load(str(pretrained), quantize=quantize)
        self.evaluator = Evaluator(self.llm, Settings(max_length=int(max_length) if max_length else None,
                                                      batch_tokens=int(batch_tokens)), show_progress=False)
        self.tokenizer = self.llm.tokenizer
        self._max_gen_toks = int(max_gen_toks)
        self._name = str(pretrained)

    # ---- what TemplateLM needs ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.evaluator.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.evaluator.max_length

    @property
    def tokenizer_name(self) -> str:
        return self._name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        if add_special_tokens is None:
            return self.evaluator.encode(string)
        return self.tokenizer.encode(string, add_bos=add_special_tokens and self.tokenizer.add_bos)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- the three request kinds ---------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        scored = [engine.Request(ctx, cont) for _, ctx, cont in requests]
        with tqdm(total=len(requests), desc="camelid loglikelihood", disable=disable_tqdm) as bar:
            results = self.evaluator.score(scored, lambda f: bar.update(round(f * len(requests)) - bar.n))
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        with tqdm(total=len(texts), desc="camelid loglikelihood_rolling", disable=disable_tqdm) as bar:
            results = self.evaluator.loglikelihood_rolling(texts, lambda f: bar.update(round(f * len(texts)) - bar.n))
        for text, ll in zip(texts, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in tqdm(requests, desc="camelid generate_until", disable=disable_tqdm):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("the camelid lm-eval model generates greedily; drop do_sample/temperature")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            text = self.evaluator.generate_until(context, until, int(kwargs.get("max_gen_toks", self._max_gen_toks)))
            self.cache_hook.add_partial("generate_until", (context, r.args[1]), text)
            out.append(text)
        return out


def task_manager(**kwargs: Any) -> Any:
    """An lm-eval TaskManager that also knows camelid's tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), **kwargs)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with the camelid model registered and camelid's tasks on the include path."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    # lm-eval takes one include path: a user's own replaces camelid's (copy camelid's YAMLs beside theirs)
    if "--include_path" not in args and any(a in ("run", "ls", "validate", "--tasks") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
