"""The prompt format camelid's vision models are trained on, and answer in.

A question is the prompt exactly as typed (`camelid generate --image pic.png "What colour is the circle?"`);
the model answers with " red" and the tokenizer's end token, which stops generation. A conversation is its
turns in that format one after the other: each question, then its answer and the end token (a system message's
text first, on its own line).
"""

from __future__ import annotations

from typing import Any

from camelid.errors import CamelidError


def end_id(tokenizer: Any) -> int:
    """The token that ends an answer: the tokenizer's end-of-sequence token (one of its stop ids)."""
    if tokenizer.eos_id is None:
        raise CamelidError("the text model's tokenizer has no end-of-sequence token, so answers could not end; "
                           "use a text model whose tokenizer defines one")
    return int(tokenizer.eos_id)


def question_ids(tokenizer: Any, question: str) -> list[int]:
    """What LLM.generate sends for a plain prompt (the tokenizer's own BOS rule)."""
    return tokenizer.encode(question, add_bos=tokenizer.add_bos)


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    return tokenizer.encode(" " + answer, add_bos=False) + [end_id(tokenizer)]


def conversation_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """A conversation (ending with the user's turn) as the model was trained to read it."""
    ids = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    for m in messages:
        role, content = m.get("role"), m.get("content", "")
        if role == "system":
            ids += tokenizer.encode(content + "\n", add_bos=False)
        elif role == "user":
            ids += tokenizer.encode(content, add_bos=False)
        elif role == "assistant":
            ids += answer_ids(tokenizer, content)
        else:
            raise CamelidError(f"message role {role!r}: a vision model takes system, user and assistant messages")
    return ids
