"""`camelid compare`: BERT against a decoder LLM on the user's own classification data, as a measured table.

Arms, all on the same train/test split:
- bert-finetune: the BERT encoder (all-MiniLM-L6-v2 by default) fine-tuned with a [CLS] head;
- llm-zeroshot: the LLM (SmolLM2-135M-Instruct) told the label set in a prompt, answering by likelihood:
  the label whose tokens are most probable after the prompt wins (no free-text parsing to go wrong);
- llm-kshot: the same with k labelled training examples in the prompt (in-context learning);
- llm-probe / llm-finetune: the LLM's last-token hidden state with a linear head, backbone frozen or trained.

Each arm runs in its own subprocess, so its peak resident memory (`ru_maxrss` of that process: weights,
activations, optimizer state) is its own. Timings are wall-clock on this machine: training time, latency per
example at batch size 1, and batched throughput. The trained arms go through the training loop
(camelid.train.classify); their log.csv and loss.png land in OUT/runs/ARM.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from camelid.classify import (
    Example,
    classification_metrics,
    label_set,
    load_llm,
    new_classifier,
    read_jsonl,
    train_test_split,
)
from camelid.errors import CamelidError
from camelid.train.classify import TrainArgs, train_classifier

ARMS = ("bert-finetune", "llm-zeroshot", "llm-kshot", "llm-probe", "llm-finetune")


@dataclass
class CompareArgs:
    data: str
    bert: str = "all-minilm-l6-v2"
    llm: str = "smollm2-135m-instruct"
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    k_shot: int = 4
    max_train: int = 0  # 0: all training examples
    max_test: int = 200  # 0: all test examples (prompted arms cost one LLM pass per example and label)
    epochs: int = 3
    bert_lr: float = 5e-5
    llm_lr: float = 2e-5
    probe_lr: float = 1e-2
    batch_size: int = 16
    max_len: int = 256
    seed: int = 0


def load_split(args: CompareArgs) -> tuple[list[Example], list[Example], list[str]]:
    examples = read_jsonl(args.data)
    train, test = train_test_split(examples, seed=args.seed)
    if args.max_train:
        train = _stratified_head(train, args.max_train)
    if args.max_test:
        test = _stratified_head(test, args.max_test)
    return train, test, label_set(examples)


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
    """One arm, measured. run_dir: where a trained arm's run goes (log.csv, loss.png); a temporary folder if None."""
    torch.manual_seed(args.seed)
    train, test, labels = load_split(args)
    index = {lab: i for i, lab in enumerate(labels)}
    y = [index[e.label] for e in test]
    texts = [e.text for e in test]
    result: dict[str, Any] = {"arm": arm, "train_examples": 0, "test_examples": len(test), "train_seconds": 0.0}
    if arm in ("bert-finetune", "llm-probe", "llm-finetune"):
        source = args.bert if arm == "bert-finetune" else args.llm
        clf = new_classifier(source, labels, args.max_len)
        mode = "probe" if arm == "llm-probe" else "finetune"
        lr = {"bert-finetune": args.bert_lr, "llm-probe": args.probe_lr, "llm-finetune": args.llm_lr}[arm]
        epochs = max(args.epochs, 20) if mode == "probe" else args.epochs  # the head alone is cheap to train
        stats = train_classifier(clf, train, TrainArgs(mode=mode, epochs=epochs, lr=lr, batch_size=args.batch_size,
                                                       seed=args.seed), out=run_dir)
        result.update(train_examples=len(train), train_seconds=stats["train_seconds"],
                      params_trainable=stats["params_trainable"], params_total=stats["params_total"])
        pred, latency, throughput = _timed_predict(clf.predict, texts, 32)
    elif arm in ("llm-zeroshot", "llm-kshot"):
        model, tok = load_llm(args.llm)
        shots = pick_shots(train, labels, args.k_shot) if arm == "llm-kshot" else []
        clf = PromptClassifier(model, tok, labels, shots, max_len=model.config.max_seq_len)
        n = sum(p.numel() for p in model.parameters())
        result.update(train_examples=len(shots), params_trainable=0, params_total=n)
        pred, latency, throughput = _timed_predict(clf.predict, texts, 1)
    else:
        raise CamelidError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    result.update(classification_metrics(y, pred, len(labels)))
    result.update(latency_ms=latency * 1000, throughput_per_s=throughput,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    return result


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


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    head = ("| arm | accuracy | macro-F1 | train time (s) | latency / example (ms) | throughput (ex/s) "
            "| peak RSS (MiB) | trainable / total params |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['arm']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['train_seconds']:.1f} "
                     f"| {r['latency_ms']:.1f} | {r['throughput_per_s']:.1f} | {r['peak_rss_mib']:.0f} "
                     f"| {r.get('params_trainable', 0):,} / {r.get('params_total', 0):,} |")
    return "\n".join(lines)


def write_report(results: Sequence[dict[str, Any]], args: CompareArgs, out: Path) -> None:
    from camelid.fileio import atomic_write_text

    table = markdown_table(results)
    atomic_write_text(out / "compare.md", f"Data: `{args.data}`\n\n{table}\n")
    payload = {"args": asdict(args), "results": list(results)}
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
