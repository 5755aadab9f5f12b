"""`camelid compare`: BERT against a decoder LLM on the user's own classification data, as a measured table.

Arms, all on the same train/dev/test split:
- bert-finetune: the BERT encoder (all-MiniLM-L6-v2 by default) fine-tuned with a [CLS] head;
- llm-zeroshot: the LLM (SmolLM2-135M-Instruct) told the label set in a prompt, answering by likelihood:
  the label whose tokens are most probable after the prompt wins (no free-text parsing to go wrong);
- llm-kshot: the same with k labelled training examples in the prompt (in-context learning);
- llm-probe / llm-finetune: the LLM's last-token hidden state with a linear head, backbone frozen or trained;
- llm-lora-head: the same head, with LoRA adapters (camelid.variants.lora) over the frozen LLM;
- llm-lora-words: LoRA on the LLM trained to answer the zero-shot prompt with the label words (SFT through the
  chat template, camelid.finetune), then scored like llm-zeroshot: by the label words' log-likelihood, so the
  answer is always one of the labels and the arm differs from llm-zeroshot only by its training.

Every trained arm is tuned on the dev split (the file's own, else a stratified share of train): one run per
learning rate of a small grid, each scored on dev after every epoch, early-stopped when the dev loss stops
falling and ending with the weights of its lowest dev loss (camelid.train.select.KeepBest); the run with the
lowest dev loss is scored on test, and the table reports its learning rate and epochs. Training time is the
whole search. The verdict compares the most accurate arm with each other arm by a paired bootstrap over the test
examples (the accuracy difference, 95% interval): an interval that reaches 0 is a tie.

Each arm runs in its own subprocess, so its peak resident memory (`ru_maxrss` of that process: weights,
activations, optimizer state) is its own. Timings are wall-clock on this machine: training time, latency per
example at batch size 1, and batched throughput. The trained arms go through the training loop
(camelid.train.classify, camelid.finetune); their log.csv and loss.png land in OUT/runs/ARM/lr-LR.
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from camelid.classify import (
    Example,
    classification_metrics,
    dev_split,
    label_set,
    load_llm,
    new_classifier,
    read_jsonl,
    train_test_split,
)
from camelid.errors import CamelidError
from camelid.train.classify import TrainArgs, tune_classifier

ARMS = ("bert-finetune", "llm-zeroshot", "llm-kshot", "llm-probe", "llm-finetune", "llm-lora-head",
        "llm-lora-words")
TRAINED = {"bert-finetune": "finetune", "llm-probe": "probe", "llm-finetune": "finetune", "llm-lora-head": "lora"}


@dataclass
class CompareArgs:
    data: str
    bert: str = "all-minilm-l6-v2"
    llm: str = "smollm2-135m-instruct"
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    k_shot: int = 4
    max_train: int = 0  # 0: all training examples
    max_dev: int = 200  # 0: all dev examples (every trained arm scores them after every epoch)
    max_test: int = 200  # 0: all test examples (prompted arms cost one LLM pass per example and label)
    epochs: int = 4  # the most epochs of a trained arm (the probe: at least 20; it trains the head alone)
    patience: int = 1  # stop a run after this many epochs without a lower dev loss
    # the learning rates each trained arm tries
    bert_lr: list[float] = field(default_factory=lambda: [5e-5, 1e-4, 2e-4])
    llm_lr: list[float] = field(default_factory=lambda: [1e-5, 3e-5])
    probe_lr: list[float] = field(default_factory=lambda: [1e-3, 1e-2])
    lora_lr: list[float] = field(default_factory=lambda: [3e-4, 1e-3])  # llm-lora-head and llm-lora-words
    lora_rank: int = 8  # alpha = 2 x rank
    batch_size: int = 16
    max_len: int = 256
    bootstrap: int = 10000  # resamples of the test set for the verdict's confidence intervals
    seed: int = 0


@dataclass
class Split:
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    labels: list[str]


def load_split(args: CompareArgs) -> Split:
    """The file's train/test split; dev is the file's dev split, or else 15% of train (stratified, seeded)."""
    examples = read_jsonl(args.data)
    train, test = train_test_split(examples, seed=args.seed)
    dev = dev_split(examples)
    if not dev:
        train, dev = train_test_split([Example(e.text, e.label) for e in train], test_fraction=0.15, seed=args.seed)
    if args.max_train:
        train = _stratified_head(train, args.max_train)
    if args.max_dev:
        dev = _stratified_head(dev, args.max_dev)
    if args.max_test:
        test = _stratified_head(test, args.max_test)
    return Split(train, dev, test, label_set(examples))


def _stratified_head(examples: list[Example], n: int) -> list[Example]:
    """The first n examples taking labels in turn, so a cut keeps every label (deterministic, no shuffling)."""
    by_label: dict[str, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    out: list[Example] = []
    queues = [list(v) for v in by_label.values()]
    while len(out) < min(n, len(examples)):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


# ---------------------------------------------------------------------------------------------------
# prompting: label scoring by likelihood


def verbalize(label: str) -> str:
    return label.replace("_", " ")


class PromptClassifier:
    """Zero- or k-shot classification with a causal LM: score ' <label>' after the prompt, pick the likeliest."""

    def __init__(self, model: Any, tokenizer: Any, labels: Sequence[str], shots: Sequence[Example] = (),
                 max_len: int = 1024, max_text_tokens: int = 200) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.labels = list(labels)
        self.shots = list(shots)
        self.max_len = max_len
        self.max_text_tokens = max_text_tokens
        self.label_ids = [tokenizer.encode(" " + verbalize(lab), add_bos=False) for lab in self.labels]

    def _clip(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_bos=False)
        if len(ids) <= self.max_text_tokens:
            return text
        return self.tokenizer.decode(ids[: self.max_text_tokens]) + " ..."

    def prompt(self, text: str) -> str:
        names = ", ".join(verbalize(lab) for lab in self.labels)
        lines = [f"Classify each text into one of these categories: {names}.", ""]
        for shot in self.shots:
            lines += [f"Text: {self._clip(shot.text)}", f"Category: {verbalize(shot.label)}", ""]
        lines += [f"Text: {self._clip(text)}", "Category:"]
        return "\n".join(lines)

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt as a user turn of the chat template when the tokenizer has one, else plain text."""
        prompt = self.prompt(text)
        tok = self.tokenizer
        if hasattr(tok, "apply_chat_template"):
            messages = [{"role": "user", "content": prompt}]
            try:
                rendered = tok.apply_chat_template(messages, add_generation_prompt=True)
            except TypeError:
                rendered = tok.apply_chat_template(messages)
            ids = tok.encode(rendered, add_bos=False) if isinstance(rendered, str) else list(rendered)
            # the answer is scored as ' <label>' after "Category:" in the assistant turn
            return ids + tok.encode("Category:", add_bos=False)
        return tok.encode(prompt, add_bos=True)

    @torch.no_grad()
    def scores(self, text: str) -> torch.Tensor:
        """Mean log-probability per token of each label's continuation. The prompt goes through the model once,
        into the KV cache; each label then costs a pass over its own few tokens only."""
        model = self.model
        prompt = self.prompt_ids(text)
        longest = max(len(x) for x in self.label_ids)
        prompt = prompt[-(self.max_len - longest):]  # keep the end: the question and "Category:"
        P = len(prompt)
        model.setup_cache(1, P + longest)
        try:
            first = F.log_softmax(model(torch.tensor([prompt]), torch.arange(P), last_only=True)[0, -1], -1)
            out = []
            for lab in self.label_ids:
                total = first[lab[0]]
                if len(lab) > 1:  # later label tokens, after the earlier ones (stale cache slots are masked)
                    logits = model(torch.tensor([lab[:-1]]), torch.arange(P, P + len(lab) - 1))[0]
                    total = total + F.log_softmax(logits, -1)[torch.arange(len(lab) - 1), torch.tensor(lab[1:])].sum()
                out.append(total / len(lab))
        finally:
            model.clear_cache()
        return torch.stack(out)

    def predict(self, texts: Sequence[str], batch_size: int = 1) -> list[int]:
        self.model.eval()
        bar = tqdm(texts, desc="prompting", file=sys.stderr, disable=len(texts) < 50, leave=False)
        return [int(self.scores(t).argmax()) for t in bar]


def pick_shots(train: Sequence[Example], labels: Sequence[str], k: int) -> list[Example]:
    """k examples, labels in turn (each label appears when k >= number of labels), fixed order."""
    return _stratified_head(list(train), k)


# ---------------------------------------------------------------------------------------------------
# one arm (runs in its own process)


def _timed_predict(predict, texts: Sequence[str], batch_size: int) -> tuple[list[int], float, float]:
    t0 = time.perf_counter()
    pred = predict(texts, batch_size)
    batched = time.perf_counter() - t0
    sample = list(texts[: min(20, len(texts))])
    t0 = time.perf_counter()
    predict(sample, 1)
    latency = (time.perf_counter() - t0) / len(sample)
    return pred, latency, len(texts) / batched


def run_arm(arm: str, args: CompareArgs, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """One arm, measured. run_dir: where a trained arm's runs go (lr-LR/log.csv, loss.png); temporary if None."""
    torch.manual_seed(args.seed)
    split = load_split(args)
    labels = split.labels
    index = {lab: i for i, lab in enumerate(labels)}
    y = [index[e.label] for e in split.test]
    texts = [e.text for e in split.test]
    result: dict[str, Any] = {"arm": arm, "train_examples": 0, "dev_examples": 0, "test_examples": len(split.test),
                              "train_seconds": 0.0}
    if arm in TRAINED:
        mode = TRAINED[arm]
        source = args.bert if arm == "bert-finetune" else args.llm
        lrs = {"bert-finetune": args.bert_lr, "llm-probe": args.probe_lr, "llm-finetune": args.llm_lr,
               "llm-lora-head": args.lora_lr}[arm]
        epochs = max(args.epochs, 20) if mode == "probe" else args.epochs  # the head alone is cheap to train
        targs = TrainArgs(mode=mode, epochs=epochs, batch_size=args.batch_size, seed=args.seed,
                          patience=args.patience, lora_rank=args.lora_rank)
        clf, stats = tune_classifier(lambda: new_classifier(source, labels, args.max_len), split.train, split.dev,
                                     lrs, targs, out=run_dir)
        result.update(_tuning(stats, len(split.train), len(split.dev)),
                      params_trainable=stats["params_trainable"], params_total=stats["params_total"])
        pred, latency, throughput = _timed_predict(clf.predict, texts, 32)
    elif arm in ("llm-zeroshot", "llm-kshot"):
        model, tok = load_llm(args.llm)
        shots = pick_shots(split.train, labels, args.k_shot) if arm == "llm-kshot" else []
        clf = PromptClassifier(model, tok, labels, shots, max_len=model.config.max_seq_len)
        n = sum(p.numel() for p in model.parameters())
        result.update(train_examples=len(shots), params_trainable=0, params_total=n)
        pred, latency, throughput = _timed_predict(clf.predict, texts, 1)
    elif arm == "llm-lora-words":
        model, tok, stats = train_label_words(args, split, run_dir)
        clf = PromptClassifier(model, tok, labels, max_len=model.config.max_seq_len)
        result.update(_tuning(stats, len(split.train), len(split.dev)),
                      params_trainable=stats["params_trainable"], params_total=stats["params_total"])
        pred, latency, throughput = _timed_predict(clf.predict, texts, 1)
    else:
        raise CamelidError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    result.update(classification_metrics(y, pred, len(labels)))
    result.update(latency_ms=latency * 1000, throughput_per_s=throughput,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
                  correct=[int(p == t) for p, t in zip(pred, y, strict=True)],
                  predictions=[labels[p] for p in pred])
    return result


def _tuning(stats: dict[str, Any], n_train: int, n_dev: int) -> dict[str, Any]:
    """What the learning-rate search chose, and what it tried."""
    return {"train_examples": n_train, "dev_examples": n_dev, "train_seconds": stats["train_seconds"],
            "lr": stats["lr"], "epochs": stats["epochs"], "max_epochs": stats["max_epochs"],
            "dev_loss": stats["dev_loss"], "trials": stats["trials"]}


def _sft_keep_best(cfg: Any, device: Any, patience: int, selected: list[Any]) -> Any:
    """The SFT objective, scored on dev after every epoch, with best-on-dev selection and early stopping."""
    from camelid.finetune import SFT
    from camelid.finetune.objective import steps_per_epoch
    from camelid.train.select import KeepBest

    sft = SFT(cfg, device)  # sets max_steps from the epochs
    cfg.eval_interval = steps_per_epoch(cfg, sft.data)
    selected.append(KeepBest(sft, cfg.eval_interval, cfg.max_steps, patience))
    return selected[-1]


def lora_param_count(model: nn.Module, rank: int) -> int:
    """Weights of rank-`rank` adapters on every linear of every block (what apply_lora's default wraps)."""
    from camelid.variants.lora import TARGETS

    return sum(rank * (m.in_features + m.out_features) for name, m in model.layers.named_modules()
               if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS)


def label_words_records(clf: PromptClassifier, examples: Sequence[Example], split: str) -> list[dict[str, Any]]:
    """Chat records teaching the zero-shot prompt's answer: the user turn is the prompt llm-zeroshot asks, the
    assistant turn 'Category: <label words>' (the scorer reads the label after 'Category:')."""
    return [{"messages": [{"role": "user", "content": clf.prompt(e.text)},
                          {"role": "assistant", "content": f"Category: {verbalize(e.label)}"}], "split": split}
            for e in examples]


def train_label_words(args: CompareArgs, split: Split, run_dir: str | os.PathLike | None) -> tuple[Any, Any, dict]:
    """llm-lora-words: LoRA SFT on the label words, one run per learning rate (early-stopped on the dev loss of
    the answer tokens); the base with the best run's adapter merged in, its tokenizer, and the search's numbers."""
    import contextlib
    import tempfile

    from camelid.fileio import atomic_write_text
    from camelid.finetune import FinetuneConfig
    from camelid.finetune.objective import load_tokenizer
    from camelid.llm import load
    from camelid.train.loop import train
    from camelid.train.select import KeepBest

    tok = load_tokenizer(args.llm)
    prompter = PromptClassifier(None, tok, split.labels)
    with contextlib.ExitStack() as stack:
        root = Path(run_dir) if run_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        data = root / "label-words.jsonl"
        records = label_words_records(prompter, split.train, "train") + label_words_records(prompter, split.dev, "dev")
        atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in records))
        # rows of up to 4 of the longest examples (packed: a row holds several shorter ones), about batch_size
        # examples per step
        longest = max(len(tok.encode(tok.apply_chat_template(r["messages"]), add_bos=False)) for r in records)
        context = load(args.llm, tokenizer=False).model.config.max_seq_len
        block = min(512, context, 4 * 64 * math.ceil((longest + 1) / 64))
        best: tuple[float, Path, dict[str, Any]] | None = None
        trials, seconds = [], 0.0
        for lr in args.lora_lr:
            out = root / f"lr-{lr:g}"
            cfg = FinetuneConfig(model=args.llm, data=str(data), data_format="chat", out=str(out),
                                 export_dir=str(out / "adapter"), method="lora", lora_rank=args.lora_rank,
                                 lora_alpha=2.0 * args.lora_rank, block_size=block,
                                 batch_size=max(1, args.batch_size // 4), epochs=args.epochs, lr=lr, min_lr=lr / 10,
                                 warmup_steps=5, eval_interval=1, checkpoint_interval=0, seed=args.seed)
            selected: list[KeepBest] = []
            t0 = time.perf_counter()
            train(cfg, objective=functools.partial(_sft_keep_best, patience=args.patience, selected=selected))
            seconds += time.perf_counter() - t0
            kb = selected[0]
            epochs = round(kb.best_step / cfg.eval_interval, 2)
            trials.append({"lr": lr, "epochs": epochs, "dev_loss": kb.best_loss, "dev_accuracy": None,
                           "train_seconds": time.perf_counter() - t0})
            if best is None or kb.best_loss < best[0]:
                best = (kb.best_loss, out / "adapter", {"lr": lr, "epochs": epochs, "max_epochs": args.epochs,
                                                        "dev_loss": kb.best_loss})
        assert best is not None
        llm = load(args.llm, adapter=best[1])
        model = llm.model.float()
    n_total = sum(p.numel() for p in model.parameters())
    n_lora = lora_param_count(model, args.lora_rank)
    stats = {**best[2], "train_seconds": seconds, "trials": trials, "params_trainable": n_lora,
             "params_total": n_total + n_lora}
    return model, llm.tokenizer, stats


# ---------------------------------------------------------------------------------------------------
# all arms, and the report


def run_compare(args: CompareArgs, out: str | os.PathLike | None = None, in_process: bool = False,
                quiet: bool = False) -> list[dict[str, Any]]:
    for arm in args.arms:
        if arm not in ARMS:
            raise CamelidError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    load_split(args)  # fail early on bad data, before starting any subprocess
    results = []
    for arm in args.arms:
        if not quiet:
            print(f"[compare] {arm} ...", file=sys.stderr)
        run_dir = None if out is None else str(Path(out) / "runs" / arm)
        if in_process:
            results.append(run_arm(arm, args, run_dir))
            continue
        cmd = [sys.executable, "-m", "camelid.compare", arm, json.dumps(asdict(args)), json.dumps(run_dir)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if not quiet else subprocess.PIPE, text=True)
        if proc.returncode != 0:
            err = (proc.stderr or "").strip().splitlines()
            raise CamelidError(f"arm {arm} failed: {err[-1] if err else 'see the messages above'}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if out is not None:  # after every arm, so a long run that is stopped keeps what it measured
            write_report(results, args, Path(out))
    if out is not None and in_process:
        write_report(results, args, Path(out))
    return results


def paired_bootstrap(best: Sequence[int], other: Sequence[int], resamples: int = 10000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """The accuracy difference best - other over the same test examples (1 = correct, 0 = wrong, per example), and
    its `level` percentile interval over `resamples` resamplings of the examples with replacement (paired: one
    draw of examples serves both arms)."""
    a, b = np.asarray(best, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise CamelidError("the two arms must be scored on the same, non-empty list of test examples")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(0, resamples, 1000):  # in blocks, so a large test set needs little memory
        n = min(1000, resamples - i)
        means[i:i + n] = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(1)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(diff.mean()), float(lo), float(hi)


def verdict(results: Sequence[dict[str, Any]], resamples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """The most accurate arm (the first of equals) against each other arm: the accuracy difference with its 95%
    paired-bootstrap interval; an interval that reaches 0 is a tie (the difference is within noise)."""
    best = max(results, key=lambda r: r["accuracy"])
    others = []
    for r in results:
        if r is best:
            continue
        diff, lo, hi = paired_bootstrap(best["correct"], r["correct"], resamples, seed)
        others.append({"arm": r["arm"], "diff": diff, "low": lo, "high": hi, "tie": lo <= 0.0})
    ties = [o for o in others if o["tie"]]
    beaten = [o for o in others if not o["tie"]]
    n = len(best["correct"])

    def named(items: list[dict[str, Any]]) -> str:
        return "; ".join(f"{o['arm']} ({-o['diff']:+.3f}, 95% CI of the difference [{-o['high']:+.3f}, "
                         f"{-o['low']:+.3f}])" for o in items)

    text = f"Most accurate: {best['arm']} ({best['accuracy']:.3f} on {n} test examples)."
    if ties:
        text += f" Within noise of it (a tie: the interval reaches 0): {named(ties)}."
    if beaten:
        text += f" Below it beyond noise: {named(beaten)}."
    return {"best": best["arm"], "accuracy": best["accuracy"], "test_examples": n, "resamples": resamples,
            "level": 0.95, "others": others, "text": text}


def markdown_table(results: Sequence[dict[str, Any]], resamples: int = 10000, seed: int = 0) -> str:
    """One row per arm: quality, its difference from the best arm (95% paired-bootstrap interval), what tuning
    chose (learning rate, epochs of the most allowed, dev loss), cost."""
    compared = {o["arm"]: o for o in verdict(results, resamples, seed)["others"]} \
        if all("correct" in r for r in results) and len(results) > 1 else {}
    head = ("| arm | accuracy | macro-F1 | vs best (95% CI) | lr | epochs | dev loss | train time (s) "
            "| latency / example (ms) | throughput (ex/s) | peak RSS (MiB) | trainable / total params |")
    lines = [head, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        o = compared.get(r["arm"])
        vs = "best" if o is None and compared else "" if o is None else \
            f"{-o['diff']:+.3f} [{-o['high']:+.3f}, {-o['low']:+.3f}]" + (" tie" if o["tie"] else "")
        lr, epochs, dev = ("-", "-", "-") if "lr" not in r else \
            (f"{r['lr']:g}", f"{r['epochs']:g} / {r['max_epochs']}", f"{r['dev_loss']:.3f}")
        lines.append(f"| {r['arm']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {vs} | {lr} | {epochs} | {dev} "
                     f"| {r['train_seconds']:.1f} | {r['latency_ms']:.1f} | {r['throughput_per_s']:.1f} "
                     f"| {r['peak_rss_mib']:.0f} | {r.get('params_trainable', 0):,} / {r.get('params_total', 0):,} |")
    return "\n".join(lines)


def write_report(results: Sequence[dict[str, Any]], args: CompareArgs, out: Path) -> None:
    from camelid.fileio import atomic_write_text

    table = markdown_table(results, args.bootstrap, args.seed)
    summary = verdict(results, args.bootstrap, args.seed) if len(results) > 1 else None
    text = f"Data: `{args.data}`\n\n{table}\n" + (f"\n{summary['text']}\n" if summary else "")
    atomic_write_text(out / "compare.md", text)
    payload = {"args": asdict(args), "verdict": summary, "results": list(results)}
    atomic_write_text(out / "compare.json", json.dumps(payload, indent=2) + "\n")
    plot(results, out / "compare.png", title=Path(args.data).name)


def plot(results: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Quality, latency and training time of each arm, side by side."""
    from camelid.train.plot import BarPanel, plot_bars

    panels = [
        BarPanel("quality", {"accuracy": [r["accuracy"] for r in results],
                             "macro-F1": [r["macro_f1"] for r in results]}, ylim=(0, 1)),
        BarPanel("latency per example, batch 1 (ms, log)", {"latency": [r["latency_ms"] for r in results]},
                 yscale="log", colors=["tab:orange"]),
        BarPanel("training time (s)", {"train": [r["train_seconds"] for r in results]}, yscale="symlog",
                 zero_label="none", colors=["tab:green"]),
    ]
    return plot_bars([r["arm"] for r in results], panels, path, title=f"BERT vs decoder LLM: {title}")


def _main(argv: list[str]) -> None:
    arm, raw, run_dir = argv
    try:
        result = run_arm(arm, CompareArgs(**json.loads(raw)), json.loads(run_dir))
    except CamelidError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
