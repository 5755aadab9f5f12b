"""Sentence embeddings from a BERT model for /v1/embeddings: mean of the real tokens' last hidden states,
L2-normalised (sentence-transformers' recipe, camelid.bert.Bert.sentence_embedding)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from camelid import hub
from camelid.errors import CamelidError
from camelid.formats import Format, detect
from camelid.interop.bert_hf import load_bert_hf_dir
from camelid.tokenizer.wordpiece import WordPiece

BATCH = 32


def bert_embedder(source: str) -> Callable[[list[Any]], tuple[list[list[float]], int]]:
    """A function texts -> (unit vectors, tokens used) over the BERT model at `source` (name, Hub id, folder)."""
    path = hub.resolve(source)
    if detect(path) is not Format.BERT:
        raise CamelidError(f"{source}: not a BERT folder; --embedding-model takes a BERT model such as "
                           "all-minilm-l6-v2")
    _, model, _ = load_bert_hf_dir(path, task="base")
    tokenizer = WordPiece.load(path)
    lock = threading.Lock()  # the tokenizer's padding settings are per call: one batch at a time

    @torch.inference_mode()
    def embed(inputs: list[Any]) -> tuple[list[list[float]], int]:
        if any(not isinstance(x, str) for x in inputs):
            raise CamelidError("input: the BERT embedding model takes texts, not token ids")
        vectors, n_tokens = [], 0
        with lock:
            for i in range(0, len(inputs), BATCH):
                batch = tokenizer(inputs[i:i + BATCH])
                n_tokens += int(batch["attention_mask"].sum())
                vectors += model.sentence_embedding(batch["input_ids"], batch["attention_mask"],
                                                    batch["token_type_ids"]).tolist()
        return vectors, n_tokens

    return embed
