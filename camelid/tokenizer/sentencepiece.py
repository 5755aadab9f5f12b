"""SentencePiece `.model` files (Llama 1/2, Mistral): read with the `sentencepiece` library and rebuilt as a
`tokenizers` BPE that llama.cpp's tokenizer matches. Only identity-normalised BPE models are accepted: NFKC
rules, whitespace folding and unigram models would silently change ids."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.tokenizer.vocab import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Vocabulary, build_spm


def read_sentencepiece(path: Path) -> Vocabulary:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception:  # noqa: BLE001 - sentencepiece raises OSError/RuntimeError for anything it cannot parse
        raise CamelidError(f"{path}: neither a tokenizer.json, a tiktoken rank file nor a SentencePiece model; "
                           "pass the model's tokenizer file") from None
    trainer = trainer_spec(path.read_bytes(), str(path))
    if trainer.get("model_type", 1) != 2:
        kind = "unigram" if trainer.get("model_type", 1) == 1 else "word/char"
        raise CamelidError(f"{path}: a SentencePiece {kind} model; camelid supports SentencePiece BPE (Llama 1/2, "
                           "Mistral)")
    normalizer = trainer.get("normalizer", "identity")
    folds = trainer.get("remove_extra_whitespaces", True)
    if normalizer != "identity" or folds:
        raise CamelidError(f"{path}: a SentencePiece model with the {normalizer!r} normalizer"
                           f"{' and whitespace folding' if folds else ''}; camelid reads identity-normalised models "
                           "(Llama 1/2, Mistral): convert it to a tokenizer.json with transformers and pass that")
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else BYTE if sp.IsByte(i)
                     else UNUSED if sp.IsUnused(i) else NORMAL)
    # user-defined pieces are "normal" to the python API; the proto says which (type 4)
    for i in trainer.get("user_defined_ids", []):
        types[i] = USER_DEFINED
    hf = build_spm(tokens, scores, types, add_space_prefix=trainer.get("add_dummy_prefix", True),
                   split_words=not trainer.get("allow_whitespace_only_pieces", False))
    bos, eos, unk = sp.bos_id(), sp.eos_id(), sp.unk_id()
    return Vocabulary(kind="spm", hf=hf, bos_id=bos if bos >= 0 else None, eos_id=eos if eos >= 0 else None,
                      unk_id=unk if unk >= 0 else None, add_bos=bos >= 0, token_types=types, scores=scores)


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message, enough to read a SentencePiece header.
    Every length is checked against the buffer: a damaged file ends the walk with a ValueError."""
    i = 0

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= len(buf) or shift > 63:
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    def take(n: int) -> bytes:
        nonlocal i
        if i + n > len(buf):
            raise ValueError("a length runs past the end of the message")
        i += n
        return buf[i - n:i]

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            yield field, wire, take(8)
        elif wire == 2:
            yield field, wire, take(varint())
        elif wire == 5:
            yield field, wire, take(4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def trainer_spec(data: bytes, source: str = "tokenizer.model") -> dict[str, Any]:
    """model_type (1 unigram, 2 BPE), allow_whitespace_only_pieces, add_dummy_prefix, the normaliser and the
    user-defined piece ids from a ModelProto (field numbers from sentencepiece_model.proto; protobuf itself is
    not needed)."""
    out: dict[str, Any] = {"user_defined_ids": []}
    piece_index = 0
    try:
        for field, _, value in _fields(data):
            if field == 1:  # repeated SentencePiece {piece=1, score=2, type=3}
                for f, _, v in _fields(value):
                    if f == 3 and v == 4:
                        out["user_defined_ids"].append(piece_index)
                piece_index += 1
            elif field == 2:  # TrainerSpec: model_type = 3, allow_whitespace_only_pieces = 26
                for f, _, v in _fields(value):
                    if f == 3:
                        out["model_type"] = v
                    elif f == 26:
                        out["allow_whitespace_only_pieces"] = bool(v)
            elif field == 3:  # NormalizerSpec: name = 1, add_dummy_prefix = 3, remove_extra_whitespaces = 4
                for f, _, v in _fields(value):
                    if f == 1:
                        out["normalizer"] = bytes(v).decode("utf-8", errors="replace")
                    elif f == 3:
                        out["add_dummy_prefix"] = bool(v)
                    elif f == 4:
                        out["remove_extra_whitespaces"] = bool(v)
    except (ValueError, TypeError) as e:
        raise CamelidError(f"{source}: a damaged SentencePiece model ({e}); re-download it") from None
    return out
