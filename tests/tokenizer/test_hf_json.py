"""camelid.tokenizer.hf_json: tokenizer.json and tokenizer_config.json in, transformers folders out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizer_helpers import MIXED, reference_cases, vocab

from camelid import hub
from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer


def test_llama2_tokenizer_json(llama2_json):
    wrong = [x for x, ids in reference_cases("llama-spm") if llama2_json.encode(x) != ids]
    assert not wrong
    assert (llama2_json.kind, llama2_json.bos_id, llama2_json.eos_id, llama2_json.add_bos) == ("spm", 1, 2, True)


def test_from_dir_reads_tokenizer_config(tmp_path, llama2_json):
    (tmp_path / "tokenizer.json").write_bytes(Path(hub.MODELS["llama2-tokenizer"].path).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": False, "chat_template": "X"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == (1, 2, False, "X")
    # the same when the tokenizer.json file is named: its tokenizer_config.json comes with it
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").add_bos is False
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(CamelidError, match="not a JSON object"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("source", ["smollm2", "llama-spm", "llama3-tiktoken"])
def test_save_pretrained_loads_in_transformers(tmp_path, source, smol, request):
    from transformers import AutoTokenizer

    tok = {"smollm2": lambda: smol, "llama-spm": lambda: vocab("llama-spm"),
           "llama3-tiktoken": lambda: request.getfixturevalue("llama3")}[source]()
    tok.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                     "special_tokens_map.json"}
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.bos_token == tok.bos_token and hf.eos_token == tok.eos_token
    assert hf.chat_template == tok.chat_template
    for text in MIXED + [x for x, _ in reference_cases("llama-bpe")[:20]]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert hf.encode(text) == tok.encode(text, add_bos=tok.add_bos), text
    # and camelid reads its own output back
    again = Tokenizer.from_dir(tmp_path)
    assert (again.bos_id, again.eos_id, again.add_bos, again.chat_template) == \
        (tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template)
    assert all(again.encode(t) == tok.encode(t) for t in MIXED)


def _word_level(texts: list[str]):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>"]))
    return hf


def test_word_level_tokenizer_json_encodes_as_tokenizers_does(tmp_path):
    """Any tokenizer.json model reads (encode/decode/save), not only BPE: a WordLevel one, as a small model
    trained from scratch might carry."""
    texts = ["the cat sat on the mat", "a dog and a cat", "the end"]
    hf = _word_level(texts)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert (tok.kind, tok.bos_id, tok.unk_id) == ("wordlevel", hf.token_to_id("<s>"), hf.token_to_id("<unk>"))
    for text in [*texts, "an unseen word", "<s> the cat"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_bos=True) == [tok.bos_id, *tok.encode(text)]
    assert tok.decode(tok.encode("the cat sat")) == hf.decode(hf.encode("the cat sat").ids)
    built = Tokenizer.from_hf(_word_level(texts), bos_id=0)
    assert built.bos_id == 0 and built.encode("the mat") == tok.encode("the mat")
    tok.save_pretrained(tmp_path / "again")
    assert Tokenizer.load(tmp_path / "again").encode("a dog sat") == tok.encode("a dog sat")
    with pytest.raises(CamelidError, match="cannot be written into GGUF"):
        tok.write_gguf(object())


def test_damaged_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 5}}')
    with pytest.raises(CamelidError, match="not a valid tokenizer.json") as e:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(e.value)
