"""Fine-tuning data: records -> the model's chat template -> token ids with a loss mask -> packed rows.

Records come from jsonl files (optionally gzipped) in one of three formats:

    chat         {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    instruction  {"instruction": ..., "input": ... (optional), "output": ...}: a user turn (instruction, a blank
                 line, input) answered by an assistant turn (output); `fields` renames the keys
    text         {"text": ...} records or .txt files: every token is learned (continued pretraining)

Chat and instruction records are rendered with the model's own chat template. The loss covers the assistant
turns only, each with its end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`), never the system or user text
or the template's scaffolding: every assistant turn is located by rendering the conversation up to it with the
generation prompt, and the text between that prompt and the end-of-turn token is what is learned. Each piece is
tokenised on its own, as at inference, where the prompt is encoded and the reply generated after it.

Packing puts several examples into one row of `block_size` tokens; `camelid.ops.attention.Documents` keeps them
apart (each attends to itself only, positions restart at 0), so a packed row computes what the examples would
alone. Rows are drawn per epoch: a permutation of the examples from (seed, epoch), packed first-fit-decreasing in
windows of 1024 examples, the rows shuffled; micro-batch g of step s reads rows from position
(s x micro-batches per step + g) x batch_size of that endless stream, so batches depend on (seed, step, g) alone.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from camelid.errors import CamelidError
from camelid.finetune.config import FinetuneConfig
from camelid.ops.attention import Documents
from camelid.tokenizer import Tokenizer

Message = dict[str, str]
PACK_WINDOW = 1024  # examples packed together (first-fit decreasing) before the rows are shuffled
ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100  # the target of a position that carries no loss (prompt, padding), as in transformers


@dataclass
class Example:
    """One tokenised example: ids and, per token, whether it is learned (a target that carries loss)."""

    ids: list[int]
    trained: list[bool]
    where: str  # file:line, for messages

    @property
    def width(self) -> int:
        """Positions it takes in a row: every token but the last is an input."""
        return len(self.ids) - 1

    @property
    def n_trained(self) -> int:
        return sum(self.trained[1:])


@dataclass
class SFTData:
    train: list[Example]
    val: list[Example]
    notes: list[str] = field(default_factory=list)  # what was dropped, truncated or split, in words


# ---------------------------------------------------------------------------------------------------
# records


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """(file:line, record) for every non-blank line of a .jsonl / .jsonl.gz file, or ("file", {"text": ...}) for a
    text file; an empty file or a line that is not JSON is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CamelidError(f"{path}: no such file; give .jsonl (or .jsonl.gz) records or .txt files")
    name = path.name.removesuffix(".gz")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            if not name.endswith((".jsonl", ".json")):
                text = fh.read()
                if not text.strip():
                    raise CamelidError(f"{path}: empty file; it holds no text to learn from")
                return [(str(path), {"text": text})]
            out = []
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise CamelidError(f"{path}:{n}: not valid JSON ({e.msg}); fix the line or remove it") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise CamelidError(f"{path}: cannot be read as UTF-8 text ({type(e).__name__}: {e})") from None
    if not out:
        raise CamelidError(f"{path}: empty file; it holds no examples (one JSON record per line)")
    return out


def data_files(spec: str) -> list[Path]:
    """Comma-separated files and folders (their .jsonl, .jsonl.gz and .txt files)."""
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        p = Path(part)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith((".jsonl", ".jsonl.gz", ".txt")))
            if not found:
                raise CamelidError(f"{p}: no .jsonl, .jsonl.gz or .txt files in this folder")
            files.extend(found)
        else:
            files.append(p)
    if not files:
        raise CamelidError("no data given; set data to .jsonl / .jsonl.gz / .txt files (e.g. --set data=train.jsonl)")
    return files


def record_format(record: Any, fields: dict[str, str], where: str) -> str:
    """chat, instruction or text, by the keys the record has."""
    key = {name: fields.get(name, name) for name in ("messages", "instruction", "output", "text")}
    if isinstance(record, dict):
        if key["messages"] in record:
            return "chat"
        if key["output"] in record or key["instruction"] in record:
            return "instruction"
        if key["text"] in record:
            return "text"
    keys = list(record) if isinstance(record, dict) else type(record).__name__
    raise CamelidError(f"{where}: cannot tell the format of this record (keys {keys}); expected "
                       f"{key['messages']!r} (chat), {key['instruction']!r} + {key['output']!r} (instruction) or "
                       f"{key['text']!r} (text); set data_format and fields")


def to_messages(record: Any, fmt: str, fields: dict[str, str], system: str, where: str) -> list[Message]:
    """A chat or instruction record as a list of messages, checked."""
    if not isinstance(record, dict):
        raise CamelidError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if fmt == "chat":
        key = fields.get("messages", "messages")
        msgs = record.get(key)
        if not isinstance(msgs, list) or not msgs:
            raise CamelidError(f"{where}: {key!r} must be a non-empty list of {{role, content}} messages")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise CamelidError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, "
                                   f"\"content\": text}}, got {json.dumps(m)[:80]}")
            out.append({"role": m["role"], "content": m["content"]})
        if system and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": system})
        return out
    k_ins, k_in, k_out = (fields.get(n, n) for n in ("instruction", "input", "output"))
    output = record.get(k_out)
    if not isinstance(output, str) or not output.strip():
        raise CamelidError(f"{where}: no assistant turn: {k_out!r} is missing or empty; every example needs an answer "
                           "to learn (rename the key with fields, e.g. --set 'fields={output: response}')")
    instruction, extra = record.get(k_ins, ""), record.get(k_in, "")
    if not isinstance(instruction, str) or not isinstance(extra, str) or not (instruction or extra).strip():
        raise CamelidError(f"{where}: {k_ins!r} (and {k_in!r}) must hold the prompt text")
    user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return ([{"role": "system", "content": system}] if system else []) + msgs


# ---------------------------------------------------------------------------------------------------
# rendering and the loss mask


def _turn_end(turn: str, stop_texts: Sequence[str]) -> int:
    """Where the learned part of an assistant turn ends: just after its end-of-turn token (the rest of the
    turn, e.g. ChatML's newline, is the template's), or the whole turn when the template writes none."""
    ends = [i + len(s) for s in stop_texts if (i := turn.find(s)) >= 0]
    return min(ends) if ends else len(turn)


def encode_chat(tok: Tokenizer, messages: list[Message], where: str) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant turn (its text
    and its end-of-turn token)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise CamelidError(f"{where}: no assistant turn; a chat example needs at least one assistant message to learn")
    stop_texts = [tok.token_to_piece(i) for i in sorted(tok.stop_ids)]

    def render(msgs: list[Message], prompt: bool) -> str:
        try:
            return tok.apply_chat_template(msgs, add_generation_prompt=prompt)
        except CamelidError as e:
            raise CamelidError(f"{where}: the chat template refuses this conversation ({e})") from None

    pieces: list[tuple[str, bool]] = []
    done = ""  # the rendered text the pieces cover so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not prompt.startswith(done) or not upto.startswith(prompt):
            raise CamelidError(f"{where}: the chat template renders turn {i} differently depending on what follows, so "
                               "the assistant's tokens cannot be located; use a template that appends turns")
        turn = upto[len(prompt):]
        end = _turn_end(turn, stop_texts)
        pieces += [(prompt[len(done):], False), (turn[:end], True), (turn[end:], False)]
        done = upto
    full = render(messages, False)
    if not full.startswith(done):
        raise CamelidError(f"{where}: the chat template renders the conversation differently from its turns; use a "
                           "template that appends turns")
    pieces.append((full[len(done):], False))
    ids: list[int] = []
    trained: list[bool] = []
    if tok.add_bos and tok.bos_id is not None and not (tok.bos_token and full.startswith(tok.bos_token)):
        ids, trained = [tok.bos_id], [False]
    for text, learn in pieces:
        if text:
            piece = tok.encode(text)
            ids += piece
            trained += [learn] * len(piece)
    return ids, trained


def encode_text(tok: Tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """Plain text: BOS (when the model uses one), the text, EOS; every token learned."""
    ids = ([tok.bos_id] if tok.bos_id is not None and tok.add_bos else []) + tok.encode(text)
    if tok.eos_id is not None:
        ids.append(tok.eos_id)
    return ids, [True] * len(ids)


def mask_segments(tok: Tokenizer, ex: Example) -> list[tuple[str, bool]]:
    """The example's text in runs of learned / not learned tokens (for --show-mask)."""
    runs: list[tuple[list[int], bool]] = []
    for i, learn in zip(ex.ids, ex.trained, strict=True):
        if runs and runs[-1][1] == learn:
            runs[-1][0].append(i)
        else:
            runs.append(([i], learn))
    return [(tok.decode(ids), learn) for ids, learn in runs]


def show_mask(tok: Tokenizer, ex: Example, color: bool = False) -> Any:
    """The example with the learned tokens marked: green on a terminal (a rich Text), else between « and »."""
    segments = mask_segments(tok, ex)
    if not color:
        return "".join(f"«{text}»" if learn else text for text, learn in segments)
    from rich.text import Text

    out = Text()
    for text, learn in segments:
        out.append(text, style="bold green" if learn else "dim")
    return out


# ---------------------------------------------------------------------------------------------------
# loading


def _examples(records: list[tuple[str, Any]], cfg: FinetuneConfig, tok: Tokenizer,
              notes: dict[str, int]) -> list[Example]:
    fmt = cfg.data_format
    limit = cfg.block_size + 1  # tokens: block_size inputs, each with its next token as target
    out = []
    for where, record in records:
        kind = fmt if fmt != "auto" else record_format(record, cfg.fields, where)
        if kind == "text":
            key = cfg.fields.get("text", "text")
            if not isinstance(record, dict) or not isinstance(record.get(key), str):
                raise CamelidError(f"{where}: no text field {key!r}; set fields (e.g. --set 'fields={{text: body}}')")
            ids, trained = encode_text(tok, record[key])
            if len(ids) > limit:  # a long text is cut into windows: each token is a target once
                notes["texts split"] += 1
                for s in range(0, len(ids) - 1, limit - 1):
                    if len(ids[s:s + limit]) > 1:
                        out.append(Example(ids[s:s + limit], trained[s:s + limit], where))
                continue
        else:
            ids, trained = encode_chat(tok, to_messages(record, kind, cfg.fields, cfg.system_prompt, where), where)
            if len(ids) > limit:
                if cfg.long_examples == "drop":
                    notes["dropped"] += 1
                    continue
                ids, trained = ids[:limit], trained[:limit]
                if not any(trained[1:]):
                    notes["dropped"] += 1  # nothing left to learn
                    continue
                notes["truncated"] += 1
        if len(ids) > 1 and any(trained[1:]):
            out.append(Example(ids, trained, where))
    return out


def load_sft_data(cfg: FinetuneConfig, tok: Tokenizer) -> SFTData:
    """Training and held-out examples as cfg describes them, with notes on what was dropped or cut."""
    records = [r for f in data_files(cfg.data) for r in read_records(f)]
    val_records: list[tuple[str, Any]] = []
    if cfg.val_data:
        val_records = [r for f in data_files(cfg.val_data) for r in read_records(f)]
    split = cfg.split_field
    if split and any(isinstance(r, dict) and split in r for _, r in records):
        splits = {str(r.get(split)) for _, r in records if isinstance(r, dict)}
        if cfg.train_split not in splits:
            raise CamelidError(f"{cfg.data}: no records with {split} = {cfg.train_split!r} (found "
                               f"{', '.join(sorted(splits))}); set train_split")
        if not cfg.val_data:
            val_records = [(w, r) for w, r in records if isinstance(r, dict) and str(r.get(split)) == cfg.val_split]
        records = [(w, r) for w, r in records if isinstance(r, dict) and str(r.get(split)) == cfg.train_split]
    elif not cfg.val_data and cfg.val_fraction > 0:
        order = np.random.default_rng(cfg.seed).permutation(len(records))
        n_val = max(1, int(round(cfg.val_fraction * len(records))))
        held = set(order[:n_val].tolist())
        val_records = [r for i, r in enumerate(records) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
    if 0 < cfg.val_examples < len(val_records):  # a sample, kept in file order
        keep = np.random.default_rng(cfg.seed).permutation(len(val_records))[:cfg.val_examples]
        val_records = [val_records[i] for i in sorted(keep.tolist())]
    counts = {"dropped": 0, "truncated": 0, "texts split": 0}
    train = _examples(records, cfg, tok, counts)
    val_counts = {"dropped": 0, "truncated": 0, "texts split": 0}
    val = _examples(val_records, cfg, tok, val_counts)
    if not train:
        raise CamelidError(f"{cfg.data}: no training examples left (of {len(records)} records, {counts['dropped']} "
                           f"longer than block_size {cfg.block_size} were dropped); raise block_size or set "
                           "long_examples=truncate")
    notes = []
    for name, c in (("training", counts), ("held-out", val_counts)):
        if c["dropped"]:
            notes.append(f"{c['dropped']} {name} examples longer than {cfg.block_size + 1} tokens were dropped "
                         "(long_examples=truncate keeps their beginning; or raise block_size)")
        if c["truncated"]:
            notes.append(f"{c['truncated']} {name} examples were truncated to {cfg.block_size + 1} tokens "
                         "(long_examples=drop leaves them out)")
        if c["texts split"]:
            notes.append(f"{c['texts split']} {name} texts longer than {cfg.block_size + 1} tokens were cut into "
                         "windows")
    return SFTData(train, val, notes)


# ---------------------------------------------------------------------------------------------------
# packing and batches


def pack(widths: Sequence[int], order: Sequence[int], block_size: int, rng: np.random.Generator) -> list[list[int]]:
    """Rows of example indices, each row's widths adding up to at most block_size: first-fit decreasing within
    windows of PACK_WINDOW examples taken in `order`, then the rows shuffled."""
    rows: list[list[int]] = []
    for s in range(0, len(order), PACK_WINDOW):
        window = sorted(order[s:s + PACK_WINDOW], key=lambda i: -widths[i])
        free: list[int] = []
        mine: list[list[int]] = []
        for i in window:
            j = next((j for j, f in enumerate(free) if f >= widths[i]), -1)
            if j < 0:
                mine.append([i])
                free.append(block_size - widths[i])
            else:
                mine[j].append(i)
                free[j] -= widths[i]
        rows += mine
    return [rows[i] for i in rng.permutation(len(rows))]


@dataclass
class Batch:
    """One micro-batch: inputs, targets (IGNORE where nothing is learned), the documents of each row, the flat
    positions whose targets are learned, and counts."""

    input_ids: Tensor  # [B, T]
    targets: Tensor  # [B, T]
    documents: Documents
    loss_positions: Tensor  # indices into the flattened [B * T]
    tokens: int  # real (not padding) input tokens
    n_trained: int  # targets that carry loss

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.targets.to(device), self.documents,
                     self.loss_positions.to(device), self.tokens, self.n_trained)


def make_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], pad_id: int) -> Batch:
    """Rows of examples as one batch: each example's tokens but the last as inputs, positions restarting per
    example, and the rest of the row (to the longest row's width) as one padding document."""
    T = max(sum(examples[i].width for i in row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    lengths = []
    for b, row in enumerate(rows):
        s, mine = 0, []
        for i in row:
            ex = examples[i]
            n = ex.width
            ids[b, s:s + n] = torch.tensor(ex.ids[:-1])
            learned = torch.tensor(ex.trained[1:])
            targets[b, s:s + n] = torch.where(learned, torch.tensor(ex.ids[1:]), IGNORE)
            mine.append(n)
            s += n
        if s < T:
            mine.append(T - s)
        lengths.append(tuple(mine))
    flat = targets.flatten()
    loss_positions = (flat != IGNORE).nonzero().squeeze(1)
    tokens = sum(examples[i].width for row in rows for i in row)
    return Batch(ids, targets, Documents(tuple(lengths)), loss_positions, tokens, len(loss_positions))


class RowStream:
    """The endless stream of rows of the training examples: epoch e's rows come from (seed, e) alone."""

    def __init__(self, examples: list[Example], block_size: int, packing: bool, seed: int) -> None:
        self.examples, self.block_size, self.packing, self.seed = examples, block_size, packing, seed
        self.widths = [ex.width for ex in examples]
        self.trained = [ex.n_trained for ex in examples]
        self._epochs: dict[int, list[list[int]]] = {}
        self._starts = [0]  # the stream position where epoch e begins (known for the epochs counted so far)

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.examples)).tolist()
            self._epochs[epoch] = pack(self.widths, order, self.block_size, rng) if self.packing \
                else [[i] for i in order]
        return self._epochs[epoch]

    def rows_per_epoch(self, epoch: int = 0) -> int:
        return len(self.epoch_rows(epoch))

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, row within it) of stream position `position`."""
        while self._starts[-1] <= position:
            self._starts.append(self._starts[-1] + len(self.epoch_rows(len(self._starts) - 1)))
        epoch = next(e for e in range(len(self._starts) - 1) if self._starts[e + 1] > position)
        return epoch, position - self._starts[epoch]

    def rows(self, first: int, n: int) -> list[list[int]]:
        out = []
        for p in range(first, first + n):
            epoch, r = self._locate(p)
            out.append(self.epoch_rows(epoch)[r])
        return out

    def fill(self) -> float:
        """The fraction of a row's token slots that hold real tokens, over the first epoch."""
        rows = self.epoch_rows(0)
        return sum(self.widths) / (len(rows) * self.block_size)


def heldout_batches(examples: list[Example], block_size: int, batch_size: int, pad_id: int,
                    max_tokens: int = 0) -> Iterator[Batch]:
    """The held-out examples in order, packed in order into rows (no shuffling); the first `max_tokens` worth
    when it is not 0."""
    rows: list[list[int]] = []
    used, total = 0, 0
    for i, ex in enumerate(examples):
        if max_tokens and total + ex.width > max_tokens and rows:
            break
        total += ex.width
        if rows and used + ex.width <= block_size:
            rows[-1].append(i)
            used += ex.width
        else:
            rows.append([i])
            used = ex.width
    for s in range(0, len(rows), batch_size):
        yield make_batch(examples, rows[s:s + batch_size], pad_id)


def steps_for_epochs(stream: RowStream, epochs: float, rows_per_step: int) -> int:
    return max(1, math.ceil(epochs * stream.rows_per_epoch() / rows_per_step))
