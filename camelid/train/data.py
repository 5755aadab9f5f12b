"""`camelid prepare`: documents -> token shards on disk, and the sampler that reads them back.

Layout of a prepared folder:
    train.bin, val.bin   the token ids of every document followed by EOS, concatenated (numpy memmap,
                         uint16 when the vocabulary fits, else uint32)
    tokenizer.json       a copy of the tokenizer, so the folder stands alone
    meta.json            written last: dtype, token and byte counts, and a fingerprint of the inputs

Interrupting is safe: shards are written under temporary names and renamed at the end, meta.json comes
last and is removed first, so a folder without meta.json is never mistaken for a finished one, and a
re-run with the same inputs finds the finished folder and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from camelid.errors import CamelidError
from camelid.fileio import atomic_write, iter_jsonl, read_json_or_none, text_files

META_VERSION = 1
_PIECE_CHARS = 1 << 16  # long documents are encoded in pieces of about this many characters


@dataclass
class Document:
    text: str
    val: bool


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------------------------
# reading sources


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    for n, record in iter_jsonl(path, "fix the line or remove it"):
        if not isinstance(record, dict) or field not in record:
            raise CamelidError(f"{path}:{n}: no field {field!r}; choose the text field with --field")
        yield str(record[field])


def read_documents(paths: list[str | Path], field: str = "text", val_files: list[str] | None = None,
                   val_fraction: float = 0.0, seed: int = 0) -> list[Document]:
    """Every text file is one document, every jsonl line another. Validation: files whose names match
    `val_files` (globs), else a `val_fraction` of documents chosen at random with `seed`."""
    files = text_files(paths, (".txt", ".md", ".jsonl"))
    docs: list[Document] = []
    for f in files:
        is_val = bool(val_files) and any(f.match(pat) or f.name == pat for pat in val_files)
        if f.suffix == ".jsonl":
            docs.extend(Document(t, is_val) for t in _jsonl_texts(f, field))
        else:
            docs.append(Document(f.read_text(encoding="utf-8", errors="replace"), is_val))
    if val_files and not any(d.val for d in docs):
        raise CamelidError(f"--val-files {', '.join(val_files)} matched none of the inputs; give a file name")
    return split_documents(docs, val_fraction, seed) if not val_files else docs


def hf_documents(name: str, split: str = "train", field: str = "text", data_files: list[str] | None = None,
                 val_fraction: float = 0.0, seed: int = 0) -> list[Document]:
    """Documents from a Hugging Face dataset (Hub name, or a builder like `json`/`text` with data_files)."""
    try:
        import datasets
    except ImportError:
        raise CamelidError("reading a Hugging Face dataset needs the `datasets` package; "
                           "pip install datasets") from None
    try:
        ds = datasets.load_dataset(name, split=split, data_files=data_files)
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one line is what the user needs
        raise CamelidError(f"dataset {name!r}: cannot be loaded ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:200]})") from None
    if field not in ds.column_names:
        raise CamelidError(f"dataset {name!r} has no column {field!r} (columns: {', '.join(ds.column_names)}); "
                           "choose one with --field")
    return split_documents([Document(str(t), False) for t in ds[field]], val_fraction, seed)


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> list[Document]:
    if not 0.0 <= val_fraction < 1.0:
        raise CamelidError(f"val fraction {val_fraction} must be in [0, 1)")
    if val_fraction == 0.0 or not docs:
        return docs
    if len(docs) == 1:
        # one document (say, one big text file): hold out its tail, cut at a line start
        text = docs[0].text
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1
        if cut <= 0 or cut >= len(text):
            raise CamelidError("the single input is too short to split into train and validation; add text")
        return [Document(text[:cut], False), Document(text[cut:], True)]
    rng = np.random.default_rng(seed)
    n_val = max(1, round(len(docs) * val_fraction))
    chosen = set(rng.choice(len(docs), size=n_val, replace=False).tolist())
    return [Document(d.text, i in chosen) for i, d in enumerate(docs)]


# ---------------------------------------------------------------------------------------------------
# encoding, in parallel worker processes

_worker_tok: Any = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core is our parallelism
    from camelid.tokenizer import Tokenizer

    _worker_tok = Tokenizer.from_file(tokenizer_path)


# a cut after a newline and before a non-space: the byte-level pre-tokenizer never merges across it
_SAFE_CUT = re.compile(r"(?<=\n)(?=\S)")


def split_pieces(text: str, size: int = _PIECE_CHARS) -> list[str]:
    """Cut a long text into pieces whose separate encodings concatenate to the encoding of the whole."""
    if len(text) <= size:
        return [text]
    pieces, start = [], 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        pieces.append(text[start:m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def _encode(text: str) -> list[int]:
    return _worker_tok.encode(text)


def _fingerprint(docs: list[Document], tokenizer_bytes: bytes) -> str:
    h = hashlib.sha256(tokenizer_bytes)
    for d in docs:
        h.update(b"V" if d.val else b"T")
        h.update(hashlib.sha256(d.text.encode("utf-8")).digest())
    return h.hexdigest()


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise CamelidError(f"{data_dir}: not a prepared data folder (no meta.json); run `camelid prepare` "
                           "(if it was interrupted, run it again)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise CamelidError(f"{path}: corrupt; delete the folder and run `camelid prepare` again") from None
    return meta


def prepare(docs: list[Document], tokenizer_path: str | Path, out_dir: str | Path, workers: int | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Encode `docs` into out_dir/{train,val}.bin; returns the metadata (also written to meta.json)."""
    from tqdm import tqdm

    from camelid.tokenizer import Tokenizer
    from camelid.tokenizer.train import separator_id

    if not docs:
        raise CamelidError("no documents to prepare; check the input paths")
    tokenizer_path = Path(tokenizer_path)
    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise CamelidError(f"{tokenizer_path}: no tokenizer.json; train one with `camelid tokenizer train`")
    tok = Tokenizer.from_file(tokenizer_path)
    tok_bytes = tokenizer_path.read_bytes()
    eos = separator_id(tok, tokenizer_path)
    vocab_size = tok.vocab_size
    dtype = token_dtype(vocab_size)
    fingerprint = _fingerprint(docs, tok_bytes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    old = read_json_or_none(meta_path) or {}
    if old.get("fingerprint") == fingerprint and all((out / f"{s}.bin").is_file() for s in ("train", "val")):
        return old  # already prepared from these very inputs
    meta_path.unlink(missing_ok=True)  # from here on the folder is "unfinished" until meta.json reappears
    for stale in out.glob(".*.partial"):
        stale.unlink()

    pieces: list[tuple[int, str]] = []  # (document index, text piece), in order
    for i, d in enumerate(docs):
        pieces.extend((i, p) for p in split_pieces(d.text))
    counts = {"train": [0, 0, 0], "val": [0, 0, 0]}  # tokens, bytes, documents
    partial = {s: out / f".{s}.bin.partial" for s in counts}
    files = {s: open(partial[s], "wb") for s in counts}  # noqa: SIM115 - closed in finally
    workers = workers or min(os.cpu_count() or 1, 8)
    total_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress)
    ctx = mp.get_context("spawn" if os.name == "nt" else "fork")
    try:
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path),)) as pool:
            texts = (p for _, p in pieces)
            for k, ids in enumerate(pool.imap(_encode, texts, chunksize=8)):
                doc_i, piece = pieces[k]
                split = "val" if docs[doc_i].val else "train"
                last = k + 1 == len(pieces) or pieces[k + 1][0] != doc_i  # EOS closes each document
                arr = np.asarray(ids + [eos] if last else ids, dtype=dtype)
                arr.tofile(files[split])
                nbytes = len(piece.encode("utf-8"))
                counts[split][0] += len(arr)
                counts[split][1] += nbytes
                counts[split][2] += int(last)
                bar.update(nbytes)
    finally:
        bar.close()
        for fh in files.values():
            fh.close()
    if counts["train"][0] == 0:
        raise CamelidError("every document went to validation; lower --val-fraction or give more files")
    for s in counts:
        os.replace(partial[s], out / f"{s}.bin")
    atomic_write(out / "tokenizer.json", lambda p: p.write_bytes(tok_bytes))
    tok_cfg = tokenizer_path.parent / "tokenizer_config.json"  # the chat template and special-token names
    if tok_cfg.is_file() and tok_cfg.resolve() != (out / "tokenizer_config.json").resolve():
        atomic_write(out / "tokenizer_config.json", lambda p: p.write_bytes(tok_cfg.read_bytes()))
    meta = {
        "version": META_VERSION, "dtype": dtype.name, "vocab_size": vocab_size, "eos_id": eos,
        **{f"{s}_{k}": counts[s][j] for s in counts for j, k in enumerate(("tokens", "bytes", "docs"))},
        "fingerprint": fingerprint,
    }
    atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta



# ---------------------------------------------------------------------------------------------------
# reading shards back


class TokenShards:
    """The prepared train/val token streams as read-only memmaps, with a deterministic batch sampler."""

    def __init__(self, data_dir: str | Path) -> None:
        self.dir = Path(data_dir)
        self.meta = read_meta(self.dir)
        if self.meta.get("objective", "clm") != "clm":
            raise CamelidError(f"{self.dir}: prepared for objective {self.meta['objective']}; train on it with "
                               f"objective={self.meta['objective']}, or prepare token shards for clm elsewhere")
        dtype = np.dtype(self.meta["dtype"])
        self.streams: dict[str, np.ndarray] = {}
        for split in ("train", "val"):
            path = self.dir / f"{split}.bin"
            expected = self.meta[f"{split}_tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise CamelidError(f"{path}: missing or of the wrong size for meta.json; run `camelid prepare` again")
            self.streams[split] = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def batch(self, seed: int, step: int, index: int, batch_size: int, block_size: int) -> tuple[Any, Any]:
        """Micro-batch number `index` of optimizer step `step`: random windows of the train stream.

        The windows depend only on (seed, step, index), never on what ran before: a resumed run, or the
        same global batch split over more processes, reads exactly the same tokens."""
        import torch

        data = self.streams["train"]
        if len(data) <= block_size:
            raise CamelidError(f"the train split has {len(data)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                               "lower block_size or add data")
        rng = np.random.default_rng([seed, step, index])
        starts = rng.integers(0, len(data) - block_size, size=batch_size)
        chunk = np.stack([data[s:s + block_size + 1].astype(np.int64) for s in starts])
        t = torch.from_numpy(chunk)
        return t[:, :-1], t[:, 1:]

    def val_windows(self, block_size: int, max_tokens: int = 0) -> Iterator[tuple[Any, Any]]:
        """Consecutive non-overlapping windows of the val stream: every token after the first is predicted once."""
        import torch

        data = self.streams["val"]
        end = len(data) - 1
        if max_tokens:
            end = min(end, max_tokens)
        for s in range(0, end, block_size):
            n = min(block_size, end - s)
            chunk = torch.from_numpy(data[s:s + n + 1].astype(np.int64))
            yield chunk[None, :-1], chunk[None, 1:]

