"""Hugging Face tokenizer files: tokenizer.json (any `tokenizers` model), tokenizer_config.json, BERT's
vocab.txt, and writing a folder transformers loads (tokenizer.json, tokenizer_config.json,
special_tokens_map.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.fileio import atomic_write_text
from camelid.tokenizer.vocab import Vocabulary, build_wordpiece

# kinds by the `tokenizers` model type
_KINDS = {"WordPiece": "wordpiece", "WordLevel": "wordlevel", "Unigram": "unigram"}
# transformers writes a huge sentinel when a tokenizer has no length limit
_NO_LIMIT = 1_000_000


def kind_of(hf: Any, spec: dict[str, Any] | None = None) -> str:
    """"bpe" (byte-level), "spm" (SentencePiece-style BPE), "wordpiece", "wordlevel" or "unigram". `spec` is
    hf's JSON form when the caller has it already."""
    spec = json.loads(hf.to_str()) if spec is None else spec
    model = spec.get("model") or {}
    if model.get("type", "BPE") != "BPE":
        return _KINDS.get(model.get("type"), str(model.get("type")).lower())
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    return "bpe" if byte_level else "spm"


def guess_pre(spec: dict[str, Any]) -> str:
    """The GGUF pre-tokenizer name whose regexes a byte-level tokenizer.json (its JSON form `spec`) uses."""
    text = json.dumps(spec.get("pre_tokenizer"))
    if "Digits" in text:
        return "smollm"
    if r"\\p{N}{1,3}" in text:
        return "llama-bpe"
    if r"[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|" in text:
        return "qwen2"
    return "gpt-2"


def vocabulary_from_hf(hf: Any, source: str = "tokenizer.json") -> Vocabulary:
    """What camelid needs to know about a `tokenizers.Tokenizer`: its kind, and BOS/EOS/UNK/PAD by the usual
    names (a tokenizer_config.json beside the file, applied afterwards, overrides them)."""
    hf.no_padding()  # encode one text exactly; batching pads on its own terms
    hf.no_truncation()
    spec = json.loads(hf.to_str())
    kind = kind_of(hf, spec)
    if kind not in ("bpe", "spm", *_KINDS.values()):
        raise CamelidError(f"{source}: a {kind} tokenizer.json; camelid reads BPE, WordPiece, WordLevel and "
                           "Unigram models")
    model = spec.get("model") or {}
    specials = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}

    def first(*names: str) -> int | None:
        return next((hf.token_to_id(t) for t in names if t in specials), None)

    unk = model.get("unk_token")
    v = Vocabulary(kind=kind, hf=hf, unk_id=hf.token_to_id(unk) if isinstance(unk, str) else None)
    if kind == "wordpiece":  # BERT: [CLS] A [SEP] around every text, by its post-processor
        v.bos_id, v.eos_id, v.pad_id, v.add_bos = first("[CLS]"), first("[SEP]"), first("[PAD]"), True
        return v
    v.pre = guess_pre(spec) if kind == "bpe" else None
    # BOS: the post-processor that adds it says which token and that it is added; EOS: by its usual name
    single = (spec.get("post_processor") or {}).get("single") or []
    head = single[0].get("SpecialToken", {}).get("id") if single and isinstance(single[0], dict) else None
    if isinstance(head, str) and hf.token_to_id(head) is not None:
        v.bos_id, v.add_bos = hf.token_to_id(head), True
    else:
        v.bos_id = first("<s>", "<|begin_of_text|>")
    v.eos_id = first("</s>", "<|end_of_text|>", "<|endoftext|>")
    return v


def read_tokenizer_json(path: Path) -> Vocabulary:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception on bad files
        first_line = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CamelidError(f"{path}: not a valid tokenizer.json ({first_line}); re-export it with "
                           "tokenizers/transformers") from None
    return vocabulary_from_hf(hf, str(path))


def read_vocab_txt(path: Path, lowercase: bool = True, strip_accents: bool | None = None) -> Vocabulary:
    """BERT's vocab.txt: one token per line, the line number is the id."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CamelidError(f"{path}: not a readable vocab.txt ({type(e).__name__}); pass a BERT vocab.txt") from None
    hf = build_wordpiece([line.rstrip("\r") for line in lines], lowercase=lowercase, strip_accents=strip_accents,
                         source=str(path))
    return vocabulary_from_hf(hf, str(path))


@dataclass
class TokenizerConfig:
    """The parts of a tokenizer_config.json camelid uses."""

    tokens: dict[str, str]  # "bos_token", "eos_token", "unk_token", "pad_token" -> the token string
    add_bos: bool | None = None
    chat_template: str | None = None
    max_len: int | None = None
    lowercase: bool = True  # BERT's do_lower_case
    strip_accents: bool | None = None


def read_tokenizer_config(path: Path) -> TokenizerConfig:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CamelidError(f"{path}: not valid JSON ({type(e).__name__}); restore the file from the model's "
                           "source") from None
    if not isinstance(cfg, dict):
        raise CamelidError(f"{path}: not a JSON object; restore the file from the model's source")
    tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = cfg.get(key)
        if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    max_len = cfg.get("model_max_length")
    add_bos = cfg.get("add_bos_token")
    strip_accents = cfg.get("strip_accents")
    return TokenizerConfig(
        tokens=tokens,
        add_bos=bool(add_bos) if isinstance(add_bos, bool) else None,
        chat_template=template if isinstance(template, str) else None,
        max_len=int(max_len) if isinstance(max_len, int | float) and 0 < max_len < _NO_LIMIT else None,
        lowercase=bool(cfg.get("do_lower_case", True)),
        strip_accents=strip_accents if isinstance(strip_accents, bool) else None,
    )


def apply_tokenizer_config(v: Vocabulary, cfg: TokenizerConfig) -> None:
    """tokenizer_config.json says which tokens are BOS/EOS/UNK/PAD, whether BOS is added, and the chat template."""
    for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token"), ("unk_id", "unk_token"),
                      ("pad_id", "pad_token")):
        found = v.id_of(cfg.tokens[key]) if key in cfg.tokens else None
        if found is not None:
            setattr(v, attr, found)
    if cfg.add_bos is not None:
        v.add_bos = cfg.add_bos
    elif v.kind == "spm" and v.bos_id is not None:
        v.add_bos = True  # LlamaTokenizer's default
    if cfg.chat_template is not None:
        v.chat_template = cfg.chat_template
    if cfg.max_len is not None:
        v.max_len = cfg.max_len


def save_pretrained(path: Path, hf: Any, *, special_tokens: dict[str, str], add_bos: bool | None,
                    chat_template: str | None, max_len: int | None) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json. `hf` must already carry the
    post-processor that adds what the model adds around a text; `add_bos` None leaves add_bos_token unwritten."""
    path.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if add_bos is not None:
        config.update(add_bos_token=add_bos, add_eos_token=False)
    config.update(clean_up_tokenization_spaces=False, model_max_length=max_len or 1 << 30, **special_tokens)
    if chat_template:
        config["chat_template"] = chat_template
    atomic_write_text(path / "tokenizer.json", hf.to_str())
    atomic_write_text(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))
    atomic_write_text(path / "special_tokens_map.json", json.dumps(special_tokens, indent=2, ensure_ascii=False))
    return path
