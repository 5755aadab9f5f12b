"""Chat templates: render a model's own Jinja template the way transformers does, with built-in fall-backs.

A model's template comes from GGUF `tokenizer.chat_template` or tokenizer_config.json. It is rendered in
Jinja's immutable sandbox with the helpers Hugging Face provides (`raise_exception`, `strftime_now`,
`bos_token`, `eos_token`, `add_generation_prompt`, the `tojson` filter, loop controls) and the same
whitespace settings (trim_blocks, lstrip_blocks), so the prompt text is identical to transformers'
(camelid/tokenizer/template_sandbox.py). Such a template is a stranger's code: it renders in a process of its
own with bounded memory, CPU time and output, and whatever goes wrong is one line blaming the template.
Models without a template get one of the built-ins: Llama 2 (`[INST] <<SYS>>`), Llama 3 (headers), ChatML.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from camelid.errors import CamelidError
from camelid.tokenizer import template_sandbox

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


# Bounds on rendering a template that came with a model file (camelid.tokenizer.template_sandbox enforces them
# in a process of its own). A chat prompt takes milliseconds and fits a context window; these are far above that.
MAX_CPU_SECONDS = 2.0
MAX_OUTPUT_CHARS = 1 << 23  # 8 Mi characters
_WALL_SECONDS = 60.0  # the caller's own last resort, should the renderer stall without spending CPU time
_AT_FAULT = "the template (it comes with the model) is at fault: fix it or use another one"


class _Renderer:
    """The renderer process (template_sandbox.serve): started on first use, again after it was stopped, and
    anew in a forked child of this process (the pipes belong to the parent)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        self.lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        # the sandbox file alone: no camelid (and no torch) in that process, and not its folder on sys.path
        code = "import runpy, sys; del sys.path[0]; runpy.run_path(sys.argv[1], run_name='__main__')"
        self.proc = subprocess.Popen([sys.executable, "-c", code, template_sandbox.__file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.pid = os.getpid()
        return self.proc

    def close(self) -> None:
        if self.proc is not None and self.pid == os.getpid():
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the renderer ends at EOF
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def render(self, request: dict[str, Any]) -> dict[str, Any]:
        line = (json.dumps(request) + "\n").encode()
        with self.lock:
            proc = self.proc
            if proc is None or self.pid != os.getpid() or proc.poll() is not None:
                proc = self._start()
            try:
                proc.stdin.write(line)
                proc.stdin.flush()
            except BrokenPipeError:  # it ended since the last call: once more, with a new one
                proc = self._start()
                proc.stdin.write(line)
                proc.stdin.flush()
            answer, stalled = self._read(proc)
            if answer is not None:
                return answer
            self.proc = None
            if stalled:
                return {"error": "time", "message": f"it gave no answer in {_WALL_SECONDS:g} s"}
            if proc.returncode == -signal.SIGVTALRM:
                return {"error": "time", "message": f"it ran for more than {MAX_CPU_SECONDS:g} s of CPU time"}
            return {"error": "died", "message": f"the process rendering it ended (exit status {proc.returncode})"}

    @staticmethod
    def _read(proc: subprocess.Popen) -> tuple[dict[str, Any] | None, bool]:
        """(the renderer's answer, False), or (None, whether it stalled) when it ended without one (a stalled
        renderer is ended here)."""
        if os.name == "posix":
            import select

            ready, _, _ = select.select([proc.stdout], [], [], _WALL_SECONDS)
            if not ready:
                proc.kill()
                proc.wait()
                return None, True
        raw = proc.stdout.readline()
        if not raw:
            proc.wait()
            return None, False
        return json.loads(raw), False


_renderer = _Renderer()
atexit.register(_renderer.close)


def _trusted(template: str) -> bool:
    return template in BUILTIN_TEMPLATES.values()


def render_chat(template: str, messages: Any, *, add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "", **kwargs: Any) -> str:
    """Render `messages` with a Jinja chat template (a name in BUILTIN_TEMPLATES, or the template text).

    A template other than the built-ins runs in the renderer process, bounded by MAX_CPU_SECONDS of CPU time,
    MAX_OUTPUT_CHARS of output and template_sandbox.MEMORY_BYTES of memory; past a bound, or on any error of
    its own, a one-line CamelidError blames the template."""
    messages = validate_messages(messages)
    template = BUILTIN_TEMPLATES.get(template, template)
    if not isinstance(template, str):
        raise CamelidError(f"a chat template is text, not {type(template).__name__}")
    # transformers passes these explicitly, so `tools is none` holds in templates that test for tools
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    context = dict(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                   eos_token=eos_token, **kwargs)
    if _trusted(template):
        from jinja2.exceptions import TemplateError

        try:
            return template_sandbox.render(template, context)
        except TemplateError as e:
            raise CamelidError(f"the chat template refused these messages: {e}") from None
    try:
        json.dumps(context)
    except (TypeError, ValueError) as e:
        raise CamelidError(f"chat template arguments must be JSON values (strings, numbers, lists, dicts): {e}") \
            from None
    answer = _renderer.render({"template": template, "context": context, "max_chars": MAX_OUTPUT_CHARS,
                               "cpu_seconds": MAX_CPU_SECONDS})
    if "text" in answer:
        return answer["text"]
    kind, message = answer["error"], " ".join(str(answer.get("message", "")).split())[:300]
    if kind == "syntax":
        raise CamelidError(f"the chat template does not parse (line {answer.get('lineno')}: {message}); fix the "
                           "template or pass another one")
    if kind == "refused":
        raise CamelidError(f"the chat template refused these messages: {message}")
    if kind in ("time", "memory", "output"):
        raise CamelidError(f"the chat template was stopped: {message}; {_AT_FAULT}")
    raise CamelidError(f"the chat template failed ({message}); {_AT_FAULT}")
