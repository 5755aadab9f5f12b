"""Chat templates: camelid's renderer against transformers' apply_chat_template, and the built-in Llama 2/3
formats against Meta's own reference code (token by token)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from camelid import hub
from camelid.errors import CamelidError
from camelid.tokenizer import Tokenizer
from camelid.tokenizer.chat_template import BUILTIN_TEMPLATES, render_chat, validate_messages

LLAMA_CPP = Path(__file__).parent / "data" / "llama.cpp"

# The templates Meta published with its Hugging Face checkpoints (tokenizer_config.json "chat_template" of
# meta-llama/Meta-Llama-3-8B-Instruct and meta-llama/Llama-2-7b-chat-hf), used here as references only.
META_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
META_LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

SYSTEM = {"role": "system", "content": "You are a concise assistant."}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "What is a camelid?"}],
    "system+user": [SYSTEM, {"role": "user", "content": "Name three camelids, please."}],
    "multi-turn": [SYSTEM, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. 你好 🦙"},
                   {"role": "user", "content": "  Count: 1 2 3\n\nthen stop.  "}],
    "no-system-multi": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}],
}


@cache
def vocab(name: str) -> Tokenizer:
    return Tokenizer.from_gguf(LLAMA_CPP / f"ggml-vocab-{name}.gguf")


@cache
def hf_tokenizer_for(name: str, tmp: str):
    """transformers' tokenizer for one of the llama.cpp test vocabularies (through save_pretrained)."""
    from transformers import AutoTokenizer

    vocab(name).save_pretrained(Path(tmp) / name)
    return AutoTokenizer.from_pretrained(Path(tmp) / name)


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def smol(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_smol(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


# ---- the model's own template renders exactly as in transformers ---------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_smollm2_template_matches_transformers(smol, hf_smol, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    ours = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    assert smol.id_of("<|im_end|>") in smol.stop_ids
    # the prompt tokenises with the chat specials as single tokens, as in transformers
    assert smol.encode(ours) == hf_smol.encode(ours, add_special_tokens=False)
    assert smol.encode(ours).count(smol.id_of("<|im_start|>")) == ours.count("<|im_start|>")


@pytest.mark.parametrize("conversation", ["system+user", "no-system-multi"])
def test_phi3_gguf_template_matches_transformers(tmp_module, conversation):
    """A template that uses bos_token and skips system messages (Phi-3's, from llama.cpp's test vocabulary)."""
    tok = vocab("phi-3")
    hf = hf_tokenizer_for("phi-3", tmp_module)
    for gen in (True, False):
        assert tok.apply_chat_template(CONVERSATIONS[conversation], add_generation_prompt=gen) == \
            hf.apply_chat_template(CONVERSATIONS[conversation], tokenize=False, add_generation_prompt=gen)


def test_hf_helpers_match_transformers(smol, hf_smol):
    """trim_blocks/lstrip_blocks, loop controls, tojson, strftime_now, {% generation %} and custom kwargs."""
    template = (
        "{% for m in messages %}\n"
        "  {% if loop.index0 > 2 %}{% break %}{% endif %}\n"
        "  {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
        "  [{{ m['role'] | upper }}] {{ m['content'] | tojson }}\n"
        "  {% generation %}{{ m['content'] | length }}{% endgeneration %}\n"
        "{% endfor %}\n"
        "year={{ strftime_now('%Y') }} bos={{ bos_token }} eos={{ eos_token }} extra={{ extra }}\n"
        "tools={{ tools is none }} documents={{ documents is none }} undefined={{ nothing is defined }}\n"
        "{% if add_generation_prompt %}>>>{% endif %}")
    messages = CONVERSATIONS["multi-turn"]
    ours = render_chat(template, messages, add_generation_prompt=True, bos_token="<|im_start|>",
                       eos_token="<|im_end|>", extra="ok <&>")
    theirs = hf_smol.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True, extra="ok <&>")
    assert ours == theirs
    assert '"Hello. 你好 🦙"' in ours  # tojson without ASCII or HTML escaping, as transformers does


# ---- the built-in fall-backs against Meta's formats ----------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_llama3_builtin_matches_meta_template(tmp_module, conversation, add_generation_prompt):
    tok = vocab("llama-bpe")  # Llama 3 vocabulary, no template
    assert tok.chat_template is None
    hf = hf_tokenizer_for("llama-bpe", tmp_module)
    messages = CONVERSATIONS[conversation]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)  # the fall-back
    theirs = hf.apply_chat_template(messages, chat_template=META_LLAMA3_TEMPLATE, tokenize=False,
                                    add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours == render_chat("llama3", messages, add_generation_prompt=add_generation_prompt,
                               bos_token="<|begin_of_text|>")


def meta_llama3_dialog_tokens(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """llama_models/llama3/chat_format.py ChatFormat.encode_dialog_prompt for text messages (Meta's reference):
    <|begin_of_text|>, per message header(role) + encode(content) + <|eot_id|>, then header("assistant")."""
    special = tok.special_tokens

    def header(role: str) -> list[int]:
        return [special["<|start_header_id|>"], *tok.encode(role), special["<|end_header_id|>"], *tok.encode("\n\n")]

    ids = [special["<|begin_of_text|>"]]
    for m in messages:
        ids += header(m["role"]) + tok.encode(m["content"]) + [special["<|eot_id|>"]]
    return ids + header("assistant")


@pytest.mark.parametrize("conversation", ["user", "system+user", "no-system-multi"])
def test_llama3_builtin_tokens_match_meta_chat_format(conversation):
    tok = Tokenizer.from_file(hub.pull("llama3-tokenizer", quiet=True))  # Meta's tiktoken file
    messages = CONVERSATIONS[conversation]
    assert tok.encode(tok.apply_chat_template(messages)) == meta_llama3_dialog_tokens(tok, messages)


def meta_llama2_dialog_tokens(tok: Tokenizer, dialog: list[dict]) -> list[int]:
    """Meta's llama/generation.py Llama.chat_completion (Llama 2): the system prompt is folded into the first
    user message between <<SYS>> markers; each exchange is encoded with BOS and EOS, the last prompt with BOS."""
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def encode(s: str, bos: bool, eos: bool) -> list[int]:
        return ([tok.bos_id] if bos else []) + tok.encode(s) + ([tok.eos_id] if eos else [])

    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]},
                  *dialog[2:]]
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        ids += encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ", True, True)
    return ids + encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", True, False)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_llama2_builtin_matches_meta(tmp_module, conversation):
    tok = vocab("llama-spm")  # Llama 2 vocabulary, no template
    assert tok.chat_template is None
    messages = CONVERSATIONS[conversation]
    ours = tok.apply_chat_template(messages)
    hf = hf_tokenizer_for("llama-spm", tmp_module)
    assert ours == hf.apply_chat_template(messages, chat_template=META_LLAMA2_TEMPLATE, tokenize=False,
                                          add_generation_prompt=True)
    assert tok.encode(ours) == meta_llama2_dialog_tokens(tok, messages)


def test_llama2_builtin_literal():
    """The example of Hugging Face's chat-templating documentation, character for character."""
    pirate = "You are a friendly chatbot who always responds in the style of a pirate"
    messages = [{"role": "system", "content": pirate},
                {"role": "user", "content": "Hello, how are you?"},
                {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
                {"role": "user", "content": "I'd like to show off how chat templating works!"}]
    assert render_chat("llama2", messages, bos_token="<s>", eos_token="</s>") == (
        "<s>[INST] <<SYS>>\nYou are a friendly chatbot who always responds in the style of a pirate\n<</SYS>>\n\n"
        "Hello, how are you? [/INST] I'm doing great. How can I help you today? </s>"
        "<s>[INST] I'd like to show off how chat templating works! [/INST]")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chatml_builtin_matches_smollm2_template(smol, add_generation_prompt):
    messages = CONVERSATIONS["multi-turn"]  # with a system message SmolLM2's template is plain ChatML
    assert render_chat("chatml", messages, add_generation_prompt=add_generation_prompt) == \
        smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert set(BUILTIN_TEMPLATES) == {"llama2", "llama3", "chatml"}


# ---- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("messages, match", [
    ("hello", "must be a list"),
    (["hello"], "message 0 is a str"),
    ([{"role": "wizard", "content": "x"}], "role 'wizard'"),
    ([{"role": "user"}], "content must be a string"),
    ([{"role": "user", "content": ["part"]}], "content must be a string"),
])
def test_bad_messages(messages, match):
    with pytest.raises(CamelidError, match=match):
        validate_messages(messages)


def test_template_errors_are_camelid_errors():
    with pytest.raises(CamelidError, match="to alternate"):
        render_chat("llama2", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(CamelidError, match="does not parse"):
        render_chat("{% for m in messages %}", [{"role": "user", "content": "a"}])
    with pytest.raises(CamelidError, match="refused"):
        render_chat("{{ raise_exception('no tools here') }}", [{"role": "tool", "content": "{}"}])
    # the sandbox: no attribute access to Python internals
    with pytest.raises(CamelidError):
        render_chat("{{ messages.__class__.__mro__ }}", [])
