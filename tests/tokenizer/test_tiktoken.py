"""camelid.tokenizer.tiktoken: Meta's Llama 3 tokenizer.model against llama.cpp's Llama 3 vectors and vocabulary."""

from __future__ import annotations

from tokenizer_helpers import reference_cases, vocab


def test_llama3_tiktoken_file(llama3):
    assert llama3._tt is not None  # the tiktoken backend
    wrong = [x for x, ids in reference_cases("llama-bpe") if llama3.encode(x) != ids]
    assert not wrong
    assert (llama3.bos_id, llama3.eos_id, llama3.add_bos, llama3.vocab_size) == (128000, 128001, True, 128256)
    assert {llama3.id_of(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")} <= llama3.stop_ids
    assert llama3.id_of("<|start_header_id|>") == 128006 and llama3.id_of("<|eot_id|>") == 128009
    # the same 128000 byte-level pieces as llama.cpp's Llama 3 vocabulary
    assert llama3._pieces[:128000] == vocab("llama-bpe")._pieces[:128000]
    assert llama3.decode(llama3.encode("<|start_header_id|>user<|end_header_id|>\n\nhé 😀")) == \
        "<|start_header_id|>user<|end_header_id|>\n\nhé 😀"


def test_llama3_tiktoken_converted_to_tokenizers(llama3):
    """The merges recovered from tiktoken ranks give a tokenizers BPE that tokenises like tiktoken."""
    hf = llama3.hf_tokenizer()
    for x, ids in reference_cases("llama-bpe"):
        assert hf.encode(x, add_special_tokens=False).ids == ids


def test_encode_batch_is_encode(llama3):
    texts = [x for x, _ in reference_cases("llama-bpe")]
    assert llama3.encode_batch(texts, add_bos=True) == [llama3.encode(t, add_bos=True) for t in texts]
