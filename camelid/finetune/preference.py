"""Preference data for DPO: records of a prompt, a chosen and a rejected answer, each side tokenised like an SFT
example (camelid.finetune.data: the model's chat template, the answer and its end-of-turn token learned).

    {"prompt": "...", "chosen": "...", "rejected": "..."}                            text form
    {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], ...}  chat form (trl's)

Held-out pairs come from a split field, from val_data, or, when the records carry a `category` (the HHH
alignment pairs), from each category separately: its prompts are ordered by the SHA-256 of their text and every
k-th goes to the held-out side (all pairs of one prompt stay on one side), so the split is the same everywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from camelid.errors import CamelidError
from camelid.finetune.config import FinetuneConfig
from camelid.finetune.data import Example, Message, data_files, encode_chat, read_records
from camelid.tokenizer import Tokenizer

SIDES = ("chosen", "rejected")
CATEGORY_HELDOUT = 0.2  # the held-out share of each category's prompts when nothing else names a split


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    prompt: list[Message]  # the conversation before the answer (for before/after generations)


@dataclass
class PreferenceData:
    train: list[Pair]
    val: list[Pair]
    notes: list[str] = field(default_factory=list)


def _messages(value: Any, role: str, side: str, where: str) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise CamelidError(f"{where}: the {side!r} side is empty; every preference pair needs a non-empty prompt, "
                               "chosen and rejected answer")
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                 and isinstance(m.get("role"), str) for m in value):
        if not any(m["content"].strip() for m in value):
            raise CamelidError(f"{where}: the {side!r} side is empty; every preference pair needs a non-empty prompt, "
                               "chosen and rejected answer")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    if value is None or value == []:
        raise CamelidError(f"{where}: the {side!r} side is missing or empty; every preference pair needs a prompt, "
                           "a chosen and a rejected answer")
    raise CamelidError(f"{where}: {side!r} must be text or a list of {{role, content}} messages, got "
                       f"{type(value).__name__}")


def encode_pair(tok: Tokenizer, record: Any, where: str, system: str = "") -> Pair:
    """One record as two examples sharing the prompt; the answers are learned, the prompt is not."""
    if not isinstance(record, dict):
        raise CamelidError(f"{where}: a preference record must be a JSON object with prompt, chosen and rejected")
    prompt = _messages(record.get("prompt"), "user", "prompt", where)
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    sides = []
    for side in SIDES:
        answer = _messages(record.get(side), "assistant", side, where)
        ids, trained = encode_chat(tok, prompt + answer, where)
        sides.append(Example(ids, trained, where))
    return Pair(sides[0], sides[1], prompt)


def _fits(pair: Pair, limit: int, mode: str) -> Pair | None:
    """The pair within `limit` tokens per side: as is, truncated (each side cut to the limit), or None (dropped,
    or nothing left to learn)."""
    if max(len(pair.chosen.ids), len(pair.rejected.ids)) <= limit:
        return pair
    if mode == "drop":
        return None
    cut = [Example(e.ids[:limit], e.trained[:limit], e.where) for e in (pair.chosen, pair.rejected)]
    if not all(any(e.trained[1:]) for e in cut):
        return None
    return Pair(cut[0], cut[1], pair.prompt)


def category_split(records: list[tuple[str, Any]], fraction: float = CATEGORY_HELDOUT) -> tuple[list, list]:
    """(train, held-out) records: within each category, prompts ordered by SHA-256, every round(1/fraction)-th
    prompt held out, all pairs of a prompt on the same side."""
    every = max(2, round(1 / fraction))
    by_category: dict[str, list[str]] = {}
    for _, r in records:
        by_category.setdefault(str(r.get("category", "")), []).append(_prompt_text(r))
    held: set[tuple[str, str]] = set()
    for cat, prompts in by_category.items():
        ordered = sorted(set(prompts), key=lambda p: hashlib.sha256(p.encode()).hexdigest())
        held |= {(cat, p) for i, p in enumerate(ordered) if i % every == 0}
    train = [(w, r) for w, r in records if (str(r.get("category", "")), _prompt_text(r)) not in held]
    val = [(w, r) for w, r in records if (str(r.get("category", "")), _prompt_text(r)) in held]
    return train, val


def _prompt_text(record: dict) -> str:
    p = record.get("prompt")
    return p if isinstance(p, str) else repr(p)


def load_preference_data(cfg: FinetuneConfig, tok: Tokenizer) -> PreferenceData:
    """Training and held-out pairs as cfg describes them (see the module docstring)."""
    records = [r for f in data_files(cfg.data) for r in read_records(f)]
    for where, r in records:
        if not isinstance(r, dict) or any(k not in r for k in ("prompt", *SIDES)):
            keys = list(r) if isinstance(r, dict) else type(r).__name__
            raise CamelidError(f"{where}: a preference record needs prompt, chosen and rejected (got {keys}); "
                               "DPO reads {\"prompt\", \"chosen\", \"rejected\"} records")
    val_records: list[tuple[str, Any]] = []
    split = cfg.split_field
    how = ""
    if cfg.val_data:
        val_records = [r for f in data_files(cfg.val_data) for r in read_records(f)]
        how = f"held-out pairs from {cfg.val_data}"
    elif split and any(split in r for _, r in records):
        val_records = [(w, r) for w, r in records if str(r.get(split)) == cfg.val_split]
        records = [(w, r) for w, r in records if str(r.get(split)) == cfg.train_split]
        how = f"split by the {split!r} field"
    elif any("category" in r for _, r in records):
        records, val_records = category_split(records, cfg.val_fraction or CATEGORY_HELDOUT)
        how = "split by category (each category's prompts, ordered by SHA-256)"
    limit = cfg.block_size + 1
    out: list[list[Pair]] = [[], []]
    dropped = [0, 0]
    for side, recs in enumerate((records, val_records)):
        for where, r in recs:
            pair = _fits(encode_pair(tok, r, where, cfg.system_prompt), limit, cfg.long_examples)
            if pair is None:
                dropped[side] += 1
            else:
                out[side].append(pair)
    if not out[0]:
        raise CamelidError(f"{cfg.data}: no training pairs left (of {len(records)} records, {dropped[0]} longer than "
                           f"block_size {cfg.block_size} were dropped); raise block_size or set long_examples=truncate")
    notes = [how] if how else []
    for name, n in zip(("training", "held-out"), dropped, strict=True):
        if n:
            notes.append(f"{n} {name} pairs with a side longer than {limit} tokens were "
                         f"{'dropped' if cfg.long_examples == 'drop' else 'left out (nothing to learn once cut)'}")
    return PreferenceData(out[0], out[1], notes)
