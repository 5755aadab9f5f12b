"""Chat templates: render a model's own Jinja template the way transformers does, with built-in fall-backs.

A model's template comes from GGUF `tokenizer.chat_template` or tokenizer_config.json. It is rendered in
Jinja's immutable sandbox with the helpers Hugging Face provides (`raise_exception`, `strftime_now`,
`bos_token`, `eos_token`, `add_generation_prompt`, the `tojson` filter, loop controls) and the same
whitespace settings (trim_blocks, lstrip_blocks), so the prompt text is identical to transformers'.
Models without a template get one of the built-ins: Llama 2 (`[INST] <<SYS>>`), Llama 3 (headers), ChatML.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from camelid.errors import CamelidError

ROLES = ("system", "user", "assistant", "tool")

# Llama 2 chat (Meta's llama/generation.py): the system prompt goes inside the first [INST] between
# <<SYS>> markers; each user/assistant exchange is "<s>[INST] user [/INST] answer </s>".
LLAMA2_TEMPLATE = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Llama 2 chat needs user and assistant turns to alternate, starting with user') }}"
    "{% endif %}"
    "{% if m['role'] == 'user' %}"
    "{% set text = m['content'] %}"
    "{% if loop.first and system is not none %}"
    "{% set text = '<<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n' ~ text %}"
    "{% endif %}"
    "{{ bos_token }}[INST] {{ text | trim }} [/INST]"
    "{% else %}"
    " {{ m['content'] | trim }} {{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# Llama 3 (Meta's llama_models/llama3/chat_format.py): <|begin_of_text|>, then per message
# <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>; the prompt ends with an assistant header.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ 'ipython' if m['role'] == 'tool' else m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# ChatML (Qwen, SmolLM): <|im_start|>role\ncontent<|im_end|>\n
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BUILTIN_TEMPLATES = {"llama2": LLAMA2_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE}


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages are a list of {"role": one of ROLES, "content": str}; anything else is a one-line error."""
    if not isinstance(messages, (list, tuple)):
        raise CamelidError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise CamelidError(f"message {i} is a {type(m).__name__}; each message is a dict with 'role' and "
                               "'content'")
        role = m.get("role")
        if role not in ROLES:
            raise CamelidError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise CamelidError(f"message {i} ({role}) has content of type {type(m.get('content')).__name__}; "
                               "content must be a string")
    return [dict(m) for m in messages]


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping (Jinja's own tojson escapes < > & ')
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment() -> Any:
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    from jinja2.exceptions import TemplateSyntaxError

    try:
        return _environment().from_string(template)
    except TemplateSyntaxError as e:
        raise CamelidError(f"the chat template does not parse (line {e.lineno}: {e.message}); fix the "
                           "template or pass another one") from e


def render_chat(template: str, messages: Any, *, add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", **kwargs: Any) -> str:
    """Render `messages` with a Jinja chat template (a name in BUILTIN_TEMPLATES, or the template text)."""
    from jinja2.exceptions import TemplateError

    messages = validate_messages(messages)
    template = BUILTIN_TEMPLATES.get(template, template)
    # transformers passes these explicitly, so `tools is none` holds in templates that test for tools
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    compiled = _compile(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **kwargs)
    except TemplateError as e:
        raise CamelidError(f"the chat template refused these messages: {e}") from e
