"""The text API (`LLM.generate`, `stream`, `chat`) on the real default model, against transformers."""

from __future__ import annotations

import pytest
import torch

import camelid
from camelid.errors import CamelidError
from camelid.llm import cut_at_stop_strings

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    ("pieces", "stop", "expected"),
    [
        (["Hello", " wor", "ld. Bye"], ["."], "Hello world"),
        (["ab", "c<", "|en", "d|>tail"], ["<|end|>"], "abc"),
        (["no stop ", "here"], ["zzz"], "no stop here"),
        (["<", "|end|>"], ["<|end|>"], ""),
        (["x<|e", "nd"], ["<|end|>"], "x<|end"),  # a prefix that never completes is released at the end
    ],
)
def test_cut_at_stop_strings(pieces: list[str], stop: list[str], expected: str) -> None:
    assert "".join(cut_at_stop_strings(iter(pieces), stop)) == expected


@pytest.fixture(scope="module")
def llm() -> camelid.LLM:
    return camelid.load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    kw = dict(gguf_file=smollm2_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, torch_dtype=torch.float32, **kw)
    return tok, model.eval()


def test_stream_never_splits_characters(llm: camelid.LLM) -> None:
    text = "Tea 🍵 and 你好, naïve café — ok 👍🏽!\n\tdone"
    ids = llm.tokenizer.encode(text)
    pieces = list(llm.tokenizer.stream(iter(ids)))
    assert len(pieces) > 5
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


@pytest.mark.slow
def test_chat_reply_equals_transformers_and_stops_at_end_of_turn(llm: camelid.LLM, hf) -> None:
    tok, model = hf
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    stats: dict[str, float] = {}
    reply = "".join(llm.chat_stream(messages, max_new_tokens=40, stats=stats))

    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    assert llm.chat_prompt(messages) == ids[0].tolist()
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=end_of_turn, pad_token_id=end_of_turn)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == end_of_turn, "transformers should have stopped at <|im_end|> within 40 tokens"
    assert reply == tok.decode(new[:-1])
    assert "Paris" in reply
    assert stats["new_tokens"] == len(new) - 1  # the end-of-turn token is not part of the reply
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply


def test_generate_equals_stream_and_stop_strings(llm: camelid.LLM) -> None:
    prompt = "Here is a list of fruits: apple, banana,"
    full = llm.generate(prompt, max_new_tokens=24)
    assert full == "".join(llm.stream(prompt, max_new_tokens=24))
    assert "," in full
    stats: dict[str, float] = {}
    cut = llm.generate(prompt, max_new_tokens=24, stop=[","], stats=stats)
    assert cut == full[: full.index(",")]
    # a stop string ends the reply early, and the timing is still complete
    assert 0 < stats["new_tokens"] < 24 and stats["start"] <= stats["first_token"] <= stats["end"]


def test_sampling_is_seeded(llm: camelid.LLM) -> None:
    a = llm.generate("Once upon a time", max_new_tokens=16, temperature=1.0, top_p=0.95, seed=3)
    b = llm.generate("Once upon a time", max_new_tokens=16, temperature=1.0, top_p=0.95, seed=3)
    assert a == b


def test_prompt_longer_than_context_names_both_numbers(llm: camelid.LLM) -> None:
    with pytest.raises(CamelidError, match=r"(?s)8192.*shorten|shorten.*8192") as e:
        llm.generate("word " * 9000, max_new_tokens=8)
    assert str(len(llm.encode_prompt("word " * 9000))) in str(e.value)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_load_answers_like_the_fp32_model(llm: camelid.LLM, mode: str) -> None:
    q = camelid.load("smollm2-135m-instruct", quantize=mode)
    assert q.model.quantized == mode
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = q.chat(messages, max_new_tokens=20)
    assert reply == llm.chat(messages, max_new_tokens=20) == "The capital of France is Paris."
