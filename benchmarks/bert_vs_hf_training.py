"""Train camelid's BertForPreTraining and transformers' (its own init, a config built from ours) on the same
batches with the same optimizer and schedule, and print both loss curves: a reference check that catches a
model/init/loss bug that slows learning (the curves should be alike within seed noise).

    PYTHONPATH=. python benchmarks/bert_vs_hf_training.py runs/data-bert-4000 --steps 300 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.bert.data import batch_seed, load_pairs
from camelid.bert.model import IGNORE, BertConfig, BertForPreTraining
from camelid.train.loop import lr_factor


def hf_model(config: BertConfig) -> nn.Module:
    import transformers

    from camelid.interop.bert_hf import bert_config_to_hf

    hf = transformers.BertForPreTraining(transformers.BertConfig(**bert_config_to_hf(config)))
    hf.tie_weights()
    return hf


def losses(kind: str, model: nn.Module, b: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    chosen = b["mlm_labels"] != IGNORE
    if kind == "camelid":
        mlm, nsp = model(b["input_ids"], b["token_type_ids"], b["attention_mask"], masked=chosen)
    else:
        out = model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"], attention_mask=b["attention_mask"])
        mlm, nsp = out.prediction_logits[chosen], out.seq_relationship_logits
    return F.cross_entropy(mlm.float(), b["mlm_labels"][chosen]), F.cross_entropy(nsp.float(), b["nsp_labels"])


def run(kind: str, seed: int, args: argparse.Namespace) -> list[tuple[float, float]]:
    train, _ = load_pairs(args.data, args.block_size, seed=0)
    tok = train.tokenizer
    config = BertConfig.from_name(args.model, vocab_size=tok.vocab_size, max_seq_len=args.block_size,
                                  pad_token_id=tok.pad_id, dropout=args.dropout, attention_dropout=args.dropout)
    torch.manual_seed(seed)
    model = BertForPreTraining(config) if kind == "camelid" else hf_model(config)
    params = [p for p in model.parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, args.steps, 0.1))
    model.train()
    curve = []
    for step in range(args.steps):
        b = train.batch_at(1337, step, 0, args.batch_size)  # the same batches for every model and seed
        torch.manual_seed(batch_seed(seed + 1, step, 0))
        mlm, nsp = losses(kind, model, b)
        opt.zero_grad(set_to_none=True)
        (mlm + nsp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append((mlm.item(), nsp.item()))
    return curve


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--model", default="bert-mini")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    curves = {}
    for seed in args.seeds:
        for kind in ("camelid", "hf"):
            t0 = time.perf_counter()
            curves[f"{kind}-{seed}"] = run(kind, seed, args)
            print(f"{kind} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    names = list(curves)
    print("steps      " + " ".join(f"{n:>14}" for n in names) + "   (mean MLM loss over the window)")
    for s in range(0, args.steps, args.every):
        row = [sum(m for m, _ in c[s:s + args.every]) / len(c[s:s + args.every]) for c in curves.values()]
        print(f"{s:4d}-{s + args.every - 1:<4d}  " + " ".join(f"{v:14.3f}" for v in row))
    k = max(1, args.steps // 5)
    for n, c in curves.items():
        print(f"{n}: last {k} steps MLM {sum(m for m, _ in c[-k:]) / k:.3f}, NSP {sum(x for _, x in c[-k:]) / k:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(curves, f)


if __name__ == "__main__":
    main()
