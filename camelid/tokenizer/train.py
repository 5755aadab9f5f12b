"""Train a byte-level BPE tokenizer (the Hugging Face `tokenizers` library) on text files.

Byte-level BPE (GPT-2 style) can encode any UTF-8 text without unknown tokens. The special tokens are
those the ChatML chat format needs (`<|im_start|>`, `<|im_end|>`) plus `<|endoftext|>`, which separates
documents in pretraining data and doubles as BOS/EOS. The output is a standard tokenizer.json, next to a
tokenizer_config.json carrying the chat template, so Hugging Face and camelid both read it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from camelid.errors import CamelidError
from camelid.fileio import atomic_write, text_files
from camelid.tokenizer.base import Tokenizer

EOS = "<|endoftext|>"
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]
DEFAULT_SPECIALS = [EOS, *CHAT_SPECIALS]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _lines(files: list[Path]) -> Iterator[str]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            yield from fh


def train_tokenizer(files: list[str | Path], vocab_size: int, out_dir: str | Path,
                    special_tokens: list[str] | None = None, min_frequency: int = 2,
                    show_progress: bool = True) -> Path:
    """Train byte-level BPE on `files` and write out_dir/tokenizer.json (+ tokenizer_config.json)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    specials = list(dict.fromkeys(special_tokens if special_tokens is not None else DEFAULT_SPECIALS))
    if not specials:
        raise CamelidError("at least one special token is needed (the end-of-text token that separates documents)")
    floor = 256 + len(specials)
    if vocab_size < floor:
        raise CamelidError(f"vocab size {vocab_size} is below the {floor} that the 256 bytes and "
                           f"{len(specials)} special tokens need; choose a larger --vocab-size")
    paths = text_files(list(files))
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    tok.train_from_iterator(_lines(paths), trainer=trainer)
    out = Path(out_dir)
    atomic_write(out / "tokenizer.json", lambda p: tok.save(str(p)))
    eos = specials[0]
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos, "eos_token": eos, "unk_token": None, "pad_token": eos,
        "model_max_length": 1 << 30, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
    }
    if all(s in specials for s in CHAT_SPECIALS):
        cfg["chat_template"] = CHATML_TEMPLATE
    atomic_write(out / "tokenizer_config.json", lambda p: p.write_text(json.dumps(cfg, indent=2) + "\n"))
    return out / "tokenizer.json"


def separator_id(tok: Tokenizer, source: str | Path = "tokenizer.json") -> int:
    """The id of the token that ends each document in prepared data: <|endoftext|> if present, else </s>,
    <eos>, <|end_of_text|>, else the tokenizer's EOS."""
    for name in (EOS, "</s>", "<eos>", "<|end_of_text|>"):
        if name in tok.special_tokens:
            return tok.special_tokens[name]
    if tok.eos_id is not None:
        return tok.eos_id
    raise CamelidError(f"{source}: the tokenizer has no end-of-text token ({EOS}); retrain it with that special token")
