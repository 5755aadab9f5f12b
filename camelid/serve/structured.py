"""Structured output by constrained decoding: `response_format` JSON mode and JSON schema, through llguidance.

At each step the grammar's matcher says which tokens may come next (a bitmask over the vocabulary); every
other token's logit is set to -inf before sampling, so the reply always parses (unless `max_tokens` cuts it).
llguidance reads our tokenizer's own `tokenizers` JSON, so the masks are exact for the
served model's vocabulary.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor

from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer

# compact, readable JSON: one space after ':' and ',', no other whitespace (a flexible-whitespace grammar lets a
# weak model emit newlines until max_tokens)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:
        raise CamelidError("structured output needs llguidance; pip install 'camelid[serve]'") from e
    return llguidance


class Grammars:
    """Compiles `response_format`s for one tokenizer (the vocabulary is converted once, on first use)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lltok: Any = None

    def lltokenizer(self) -> Any:
        if self._lltok is None:
            llg = _llguidance()
            tok = self.tokenizer
            # the vocabulary as `tokenizers` JSON (tiktoken vocabularies are converted by the Tokenizer)
            self._lltok = llg.LLTokenizer(tok.hf_tokenizer().to_str(), n_vocab=self.vocab_size,
                                          eos_token=sorted(tok.stop_ids))
        return self._lltok

    def matcher(self, response_format: dict[str, Any]) -> Constraint | None:
        """A fresh constraint for one sequence, or None for {"type": "text"}. Raises CamelidError (a 400) for a
        format or schema that cannot be compiled."""
        kind = response_format.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            schema: Any = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise CamelidError("response_format.json_schema must be an object with a 'schema' object")
            schema = spec.get("schema", {})
        else:
            raise CamelidError(f"response_format type {kind!r} is not supported; use text, json_object or json_schema")
        llg = _llguidance()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
        except ValueError as e:
            raise CamelidError(f"response_format: the JSON schema is not valid ({e})") from e
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer())
        if is_error:
            raise CamelidError(f"response_format: the JSON schema cannot be compiled ({messages[0]})")
        matcher = llg.LLMatcher(self.lltokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise CamelidError(f"response_format: the JSON schema cannot be compiled ({matcher.get_error()})")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One sequence's grammar state: `mask(logits)` before sampling, `advance(token)` after."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher, self.vocab_size = matcher, vocab_size

    def mask(self, logits: Tensor) -> Tensor:
        """logits [V] with every token the grammar forbids here at -inf."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool)
        return logits.masked_fill(~torch.from_numpy(allowed), float("-inf"))

    def advance(self, token: int) -> bool:
        """Feed the sampled token; False when the grammar is complete (only end-of-text may follow) or broken."""
        self.matcher.consume_token(token)
        return not (self.matcher.is_stopped() or self.matcher.is_error())
