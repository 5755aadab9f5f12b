"""Run evaluation tasks on a loaded model: the Evaluator turns prompts into token requests (tokenised as
lm-eval's `hf` model does), scores them with camelid.eval.engine, and reduces the scores to metrics."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from camelid.errors import CamelidError
from camelid.eval import engine, metrics
from camelid.eval.server import ServerLLM
from camelid.eval.tasks import (
    GENERATION,
    MULTIPLE_CHOICE,
    PERPLEXITY,
    TARGET_DELIMITER,
    Task,
    build_context,
    fewshot,
    instruction_text,
    question_text,
    read_instructions,
    read_multiple_choice,
    read_text,
)


@dataclass
class Settings:
    """Everything that changes a number; written into the results JSON."""

    num_fewshot: int = 0
    chat: bool = False  # prompts through the model's chat template
    limit: int | None = None  # the first `limit` examples of each task; of a text, its first paragraphs
    max_tokens: int | None = None  # perplexity: score only about the first `max_tokens` tokens of each text
    max_length: int | None = None  # tokens a sequence may read (default: the model's context window)
    stride: int | None = None  # perplexity: new tokens scored per window (default: the whole window)
    max_new_tokens: int = 128  # generation
    batch_tokens: int = 1024  # new tokens per forward pass

    def __post_init__(self) -> None:
        if self.num_fewshot < 0:
            raise CamelidError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and self.limit < 1:
            raise CamelidError(f"limit must be >= 1, got {self.limit}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise CamelidError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_new_tokens < 1 or self.batch_tokens < 1:
            raise CamelidError("max_new_tokens and batch_tokens must be >= 1")


class Evaluator:
    """Scoring and generation for one loaded model (`camelid.LLM`), shared by `camelid eval` and the
    lm-eval `camelid` model, so the two give the same numbers."""

    def __init__(self, llm: Any, settings: Settings | None = None, show_progress: bool = True) -> None:
        if llm.tokenizer is None:
            raise CamelidError(f"{llm.source or 'the model'} has no tokenizer; evaluation needs one beside the weights")
        self.llm, self.tok = llm, llm.tokenizer
        self.server = llm if isinstance(llm, ServerLLM) else None
        self.model = None if self.server else llm.model
        self.settings = settings or Settings()
        self.show_progress = show_progress
        if self.server:  # a prompt of max_length + 1 tokens (its last one is scored, not read) and the one
            # token of max_tokens 0 that a server's context check counts
            self.context = self.server.context_length or 2 + (self.settings.max_length or 2048)
            default = self.context - 2
        else:
            self.context = default = llm.config.max_seq_len
        self.max_length = self.settings.max_length or default
        if self.max_length > default:
            raise CamelidError(f"max_length {self.max_length} exceeds the model's context window ({default})")
        self.stats: dict[str, int] = {}  # tokens requested and computed (camelid.eval.engine)

    # ---- tokenisation, as lm-eval's hf model does it ---------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        """Conditions the first token of a text: BOS, or EOS for tokenizers without one (as lm-eval)."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def encode(self, text: str) -> list[int]:
        """The tokenizer's default (BOS when it adds one), but no second BOS when the text starts with it."""
        bos = self.tok.bos_token
        return self.tok.encode(text, add_bos=self.tok.add_bos and not (bos and text.startswith(bos)))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens: the continuation's tokens are those of context + continuation past
        the context's own tokens; trailing spaces of the context move to the continuation; an empty context
        is the prefix token (lm-eval's TemplateLM.loglikelihood and _encode_pair)."""
        if not context:
            cont = self.tok.encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    def chat_template(self, messages: list[dict[str, str]]) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=True)

    # ---- the three request kinds ---------------------------------------------------------------------------
    def score(self, requests: Sequence[engine.Request], progress: Callable[[float], None] | None = None
              ) -> list[tuple[float, bool]]:
        def on_tokens(done: int, total: int) -> None:
            if progress is not None:
                progress(done / max(total, 1))

        if self.server:
            return self.server.score(requests, max_length=self.max_length, on_tokens=on_tokens, stats=self.stats)
        return engine.loglikelihood(self.model, requests, max_length=self.max_length,
                                    batch_tokens=self.settings.batch_tokens, on_tokens=on_tokens, stats=self.stats)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], progress: Callable[[float], None] | None = None
                      ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether it is the greedy continuation) per (context, continuation)."""
        requests = []
        for context, continuation in pairs:
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:
                raise CamelidError(f"the continuation {continuation!r} has no tokens of its own after its context")
            requests.append(engine.Request(ctx, cont))
        return self.score(requests, progress)

    def rolling_requests(self, text: str) -> list[engine.Request]:
        return engine.rolling_windows(self.encode(text), self.prefix_token_id, self.max_length,
                                      self.settings.stride)

    def loglikelihood_rolling(self, texts: Sequence[str], progress: Callable[[float], None] | None = None
                              ) -> list[float]:
        """log p(text) of each text, every token scored once (windows of max_length tokens)."""
        windows = [self.rolling_requests(t) for t in texts]
        flat = self.score([w for ws in windows for w in ws], progress)
        out, i = [], 0
        for ws in windows:
            out.append(sum(ll for ll, _ in flat[i:i + len(ws)]))
            i += len(ws)
        return out

    def generate_until(self, context: str, until: Sequence[str] = (), max_new_tokens: int | None = None) -> str:
        """Greedy continuation of `context`, cut before the first `until` string; ends at the model's
        end-of-turn or end-of-text token."""
        ids = self.encode(context)
        n = max_new_tokens or self.settings.max_new_tokens
        if len(ids) + n > self.context:
            ids = ids[-(self.context - n):]  # keep the end of the prompt, as lm-eval does
        if self.server:
            return self.server.generate(ids, max_new_tokens=n, stop=until)
        return self.llm.generate(ids, max_new_tokens=n, temperature=0.0, stop=list(until))

    # ---- tasks ---------------------------------------------------------------------------------------------
    def run(self, task: Task, label: str = "") -> dict[str, Any]:
        runners = {MULTIPLE_CHOICE: self._multiple_choice, PERPLEXITY: self._perplexity, GENERATION: self._generation}
        t0, before = time.perf_counter(), dict(self.stats)
        result = runners[task.kind](task, label)
        seconds = time.perf_counter() - t0
        result.update(task=task.name, kind=task.kind, path=str(task.path), seconds=round(seconds, 3),
                      examples_per_s=round(result["examples"] / seconds, 3) if seconds else None,
                      **{k: v - before.get(k, 0) for k, v in self.stats.items()})
        return result

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="ex", disable=not self.show_progress, leave=True,
                    bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")

    def _progress(self, bar: tqdm, total: int) -> Callable[[float], None]:
        def update(fraction: float) -> None:
            bar.update(fraction * total - bar.n)

        return update

    def _multiple_choice(self, task: Task, label: str) -> dict[str, Any]:
        pool = read_multiple_choice(task.path)
        examples = pool[: self.settings.limit]
        template = self.chat_template if self.settings.chat else None
        delimiter = "" if self.settings.chat else TARGET_DELIMITER
        pairs, spans = [], []
        for ex in examples:
            turns = [(question_text(s), s.choices[s.answer]) for s in fewshot(pool, ex, self.settings.num_fewshot)]
            context = build_context(turns, question_text(ex), template)
            spans.append((len(pairs), len(ex.choices)))
            pairs += [(context, delimiter + c) for c in ex.choices]
        with self._bar(len(examples), f"{label}{task.name}") as bar:
            scores = self.loglikelihood(pairs, self._progress(bar, len(examples)))
        per_example = []
        totals = {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 0.0}
        for ex, (i, k) in zip(examples, spans, strict=True):
            lls = [ll for ll, _ in scores[i:i + k]]
            m = metrics.multiple_choice(lls, ex.choices, ex.answer)
            for key in totals:
                totals[key] += m[key]
            per_example.append({"answer": ex.answer, "loglikelihoods": lls, **m})
        n = len(examples)
        chance = sum(1 / len(ex.choices) for ex in examples) / n
        return {"examples": n, "metrics": {k: v / n for k, v in totals.items()},
                "chance": {"acc": chance, "acc_norm": chance, "acc_bytes": chance},
                "stderr": {k: _binomial_stderr(v / n, n) for k, v in totals.items()},
                "per_example": per_example}

    def cut_text(self, text: str) -> str:
        """The part of a text that perplexity scores: its first `limit` paragraphs (blocks separated by blank
        lines), then at most its first `max_tokens` tokens, cut where the last of them ends in the text."""
        if self.settings.limit is not None:
            gaps = list(re.finditer(r"\n[ \t]*\n\s*", text))
            if len(gaps) >= self.settings.limit:
                text = text[:gaps[self.settings.limit - 1].start() + 1]
        n = self.settings.max_tokens
        if n is not None:
            tokens = self.encode(text)
            if len(tokens) > n:
                bos = int(bool(tokens) and tokens[0] == self.tok.bos_id and self.tok.add_bos)
                text = text[:len(self.tok.decode(tokens[bos:n]))]
        return text

    def _perplexity(self, task: Task, label: str) -> dict[str, Any]:
        text = self.cut_text(read_text(task.path))
        tokens = self.encode(text)
        with self._bar(1, f"{label}{task.name}") as bar:
            (ll,) = self.loglikelihood_rolling([text], self._progress(bar, 1))
        n_bytes, n_words = len(text.encode("utf-8")), len(re.split(r"\s+", text))
        bpb = metrics.bits_per_byte(ll, n_bytes)
        uniform = len(tokens) * math.log2(self.tok.vocab_size) / n_bytes
        return {"examples": 1, "tokens": len(tokens), "bytes": n_bytes, "loglikelihood": ll,
                "metrics": {"bits_per_byte": bpb, "byte_perplexity": 2 ** bpb,
                            "token_perplexity": math.exp(-ll / len(tokens)),
                            "word_perplexity": math.exp(-ll / n_words)},
                "chance": {"bits_per_byte": uniform, "byte_perplexity": 2 ** uniform,
                           "token_perplexity": float(self.tok.vocab_size)}}

    def _generation(self, task: Task, label: str) -> dict[str, Any]:
        everything = read_instructions(task.path)
        examples = [e for e in everything if task.split is None or e.split == task.split][: self.settings.limit]
        if not examples:
            raise CamelidError(f"{task.path}: no examples in split {task.split!r}")
        template = self.chat_template if self.settings.chat else None
        until = [] if self.settings.chat else ["\n\n"]
        per_example = []
        with self._bar(len(examples), f"{label}{task.name}") as bar:
            for ex in examples:
                pool = [e for e in everything if e.split != task.split and e.task == ex.task]
                turns = [(instruction_text(s), s.output.strip()) for s in fewshot(pool, ex, self.settings.num_fewshot)]
                prediction = self.generate_until(build_context(turns, instruction_text(ex), template), until)
                per_example.append({"prediction": prediction, "reference": ex.output,
                                    "exact_match": metrics.exact_match(prediction, ex.output),
                                    "rouge_l": metrics.rouge_l(prediction, ex.output)})
                bar.update(1)
        n = len(examples)
        scores = {k: sum(p[k] for p in per_example) / n for k in ("exact_match", "rouge_l")}
        return {"examples": n, "metrics": scores, "chance": {},
                "stderr": {"exact_match": _binomial_stderr(scores["exact_match"], n)}, "per_example": per_example}


def _binomial_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


PRECISIONS = ("fp32", "int8", "int4")


def evaluate(models: Sequence[str], precisions: Sequence[str], tasks: Sequence[Task], settings: Settings, *,
             show_progress: bool = True, server: str | None = None, api_key: str | None = None) -> dict[str, Any]:
    """Every task on every (model, precision): the report that camelid.eval.report writes. fp32 is the model
    as loaded; int8 / int4 are camelid.load(..., quantize=...) (weight-only; activations stay fp32).
    With `server` (a URL), one run scores through that server's /v1/completions echo log-probabilities, with
    the tokenizer of each model in `models` (the model the server serves); precisions do not apply."""
    import torch

    import camelid
    from camelid.ops.native import cpu_name

    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise CamelidError(f"precision {bad[0]!r}: choose from {', '.join(PRECISIONS)}")
    if not models or not precisions or not tasks:
        raise CamelidError("give at least one model, one precision and one task")
    readers = {MULTIPLE_CHOICE: read_multiple_choice, PERPLEXITY: read_text, GENERATION: read_instructions}
    for task in tasks:  # a bad line fails now, not after the models load
        readers[task.kind](task.path)
    runs = []
    if server:
        from camelid.llm import model_tokenizer, resolve

        for source in models:
            tok = model_tokenizer(resolve(source))
            if tok is None:
                raise CamelidError(f"{source}: no tokenizer beside the weights; -m names the served model, whose "
                                   "tokenizer camelid eval needs")
            llm = ServerLLM(server, tok, api_key=api_key)
            label = "server" if len(models) == 1 else f"{Path(str(source)).name} server"
            evaluator = Evaluator(llm, settings, show_progress=show_progress)
            results = [evaluator.run(task, label=f"{label}: ") for task in tasks]
            runs.append({"label": label, "model": str(source), "source": llm.source, "precision": "server",
                         "server": server, "max_length": evaluator.max_length, "results": results})
        precisions = []
    for source in models:
        for precision in precisions:
            label = precision if len(models) == 1 else f"{Path(str(source)).name} {precision}"
            t0 = time.perf_counter()
            llm = camelid.load(source, quantize=None if precision == "fp32" else precision)
            load_seconds = time.perf_counter() - t0
            evaluator = Evaluator(llm, settings, show_progress=show_progress)
            results = [evaluator.run(task, label=f"{label}: ") for task in tasks]
            runs.append({"label": label, "model": str(source), "source": llm.source, "precision": precision,
                         "parameters": llm.config.num_params(), "max_length": evaluator.max_length,
                         "load_seconds": round(load_seconds, 3), "results": results})
            del llm, evaluator
    return {"camelid_version": camelid.__version__, "torch_version": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "settings": asdict(settings),
            "tasks": [{"name": t.name, "kind": t.kind, "path": str(t.path), "split": t.split} for t in tasks],
            "threads": torch.get_num_threads(), "cpu": cpu_name(), "runs": runs}
