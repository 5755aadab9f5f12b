"""tiktoken rank files (Llama 3's original tokenizer.model: base64 token + rank lines, not a SentencePiece
proto), encoded by the `tiktoken` library, and converted to a `tokenizers` BPE when a tokenizer.json or a
GGUF vocabulary is wanted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.tokenizer.vocab import CONTROL, LLAMA3_REGEX, NORMAL, Vocabulary, build_bpe, bytes_to_unicode

# Llama 3's tiktoken layout (llama_models/llama3/tokenizer.py): 128000 ranks, then 256 specials
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
                   "<|image|>"]
LLAMA3_NUM_SPECIALS = 256


def read_tiktoken(path: Path, pattern: str | None = None, specials: list[str] | None = None) -> Vocabulary:
    """A tiktoken rank file; Llama 3's specials and regex unless told otherwise."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:  # noqa: BLE001 - base64/ValueError/... for a damaged file
        raise CamelidError(f"{path}: not a valid tiktoken rank file ({type(e).__name__}); pass Llama 3's "
                           "original tokenizer.model or the model's tokenizer.json") from None
    if specials is None:
        specials = LLAMA3_SPECIALS + [f"<|reserved_special_token_{i}|>"
                                      for i in range(2, LLAMA3_NUM_SPECIALS - len(LLAMA3_SPECIALS) + 2)]
    n = len(ranks)
    enc = tiktoken.Encoding(name=path.stem, pat_str=pattern or LLAMA3_REGEX, mergeable_ranks=ranks,
                            special_tokens={s: n + i for i, s in enumerate(specials)})
    ids = enc._special_tokens
    return Vocabulary(kind="bpe", tiktoken=enc, pre="llama-bpe", bos_id=ids.get("<|begin_of_text|>"),
                      eos_id=ids.get("<|end_of_text|>"), add_bos=True)


def pieces(enc: Any) -> list[str]:
    """Every token as its byte-level BPE string (the form tokenizer.json and GGUF use)."""
    b2u = bytes_to_unicode()
    out = [""] * enc.n_vocab
    for token, rank in enc._mergeable_ranks.items():
        out[rank] = "".join(b2u[b] for b in token)
    for s, i in enc._special_tokens.items():
        out[i] = s
    return out


def token_types(enc: Any) -> list[int]:
    """Ranked tokens are normal, the specials after them control tokens."""
    n = len(enc._mergeable_ranks)
    return [NORMAL if i < n else CONTROL for i in range(enc.n_vocab)]


def merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover BPE merges from tiktoken ranks: run BPE on each token with only lower ranks allowed;
    what is left is the pair that merges into it (tiktoken's own educational converter does this)."""
    out = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[1]):
                    best = (i, r)
            if best is None:
                break
            i = best[0]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            out.append((parts[0], parts[1]))
    return out


def to_hf(enc: Any) -> Any:
    """The same vocabulary as a `tokenizers` byte-level BPE (it tokenises exactly as tiktoken does)."""
    b2u = bytes_to_unicode()
    pairs = [("".join(b2u[b] for b in a), "".join(b2u[b] for b in b_)) for a, b_ in merges(enc._mergeable_ranks)]
    return build_bpe(pieces(enc), token_types(enc), pairs, pre="llama-bpe")
