"""One Tokenizer over every vocabulary camelid meets, split by backend:

    base.py           Tokenizer (encode/decode/stream/chat/specials/save) and StreamDecoder
    vocab.py          what a backend hands the Tokenizer; token types; `tokenizers` pipelines from raw vocabularies
    hf_json.py        tokenizer.json, tokenizer_config.json, vocab.txt; writing a transformers folder
    sentencepiece.py  SentencePiece .model files
    tiktoken.py       tiktoken rank files (Llama 3's tokenizer.model)
    gguf.py           vocabularies embedded in GGUF files
    wordpiece.py      WordPiece: BERT's pairs and padded batches
    chat_template.py  sandboxed Jinja rendering of chat templates, built-in templates
    train.py          byte-level BPE training (`camelid tokenizer train`)
"""

from camelid.tokenizer.base import StreamDecoder, Tokenizer
from camelid.tokenizer.vocab import (
    BYTE,
    CONTROL,
    END_OF_TURN_TOKENS,
    NORMAL,
    PRE_TOKENIZER_REGEXES,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    bytes_to_unicode,
)
from camelid.tokenizer.wordpiece import WordPiece

__all__ = ["BYTE", "CONTROL", "END_OF_TURN_TOKENS", "NORMAL", "PRE_TOKENIZER_REGEXES", "UNKNOWN", "UNUSED",
           "USER_DEFINED", "StreamDecoder", "Tokenizer", "WordPiece", "bytes_to_unicode"]
