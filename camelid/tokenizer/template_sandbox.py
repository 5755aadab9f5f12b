"""Jinja as transformers renders chat templates, and the process that renders the templates of model files.

The environment: Jinja's immutable sandbox (no attribute access to Python internals, no mutation of lists
and dicts) with the helpers Hugging Face provides (`raise_exception`, `strftime_now`, the `tojson` filter without
HTML escaping, loop controls, `{% generation %}`) and the same whitespace settings (trim_blocks, lstrip_blocks).

A model's template comes from a stranger's file, and the sandbox bounds what it may touch, not how much work it
does: `{{ 'A' * 10**10 }}` or two nested loops of 10**5 would run for as long as they like. So
camelid.tokenizer.chat_template renders such templates in a separate process running this file (`serve`), in
which the operating system enforces the bounds, whatever Python or C code the template drives:

    memory       RLIMIT_AS: the process's whole address space (a bigger allocation fails: MemoryError)
    time         ITIMER_VIRTUAL: CPU seconds per rendering; SIGVTALRM, left at its default action, ends the
                 process even inside one long C call (the caller sees it die and says why)
    output       characters of the rendered text, counted while it is produced

This file imports nothing from camelid (the renderer process starts with Python and Jinja alone).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from functools import lru_cache
from typing import Any

MEMORY_BYTES = 512 << 20  # the renderer process's address space, Python and Jinja included (~30 MB of it)


class OutputTooLong(Exception):
    pass


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
def environment() -> Any:
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
def compile_template(template: str) -> Any:
    return environment().from_string(template)


def render(template: str, context: dict[str, Any], max_chars: int | None = None) -> str:
    """The template rendered with `context`; OutputTooLong past `max_chars` characters. Jinja's exceptions
    pass through (TemplateSyntaxError, TemplateError, ...)."""
    compiled = compile_template(template)
    if max_chars is None:
        return compiled.render(**context)
    pieces, n = [], 0
    for piece in compiled.generate(**context):
        n += len(piece)
        if n > max_chars:
            raise OutputTooLong(f"its output grew past {max_chars:,} characters")
        pieces.append(piece)
    return "".join(pieces)


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    try:
        return {"text": render(request["template"], request["context"], request["max_chars"])}
    except TemplateSyntaxError as e:
        return {"error": "syntax", "message": e.message or str(e), "lineno": e.lineno}
    except TemplateError as e:  # raise_exception, undefined values, the sandbox's refusals
        return {"error": "refused", "message": str(e)}
    except OutputTooLong as e:
        return {"error": "output", "message": str(e)}
    except MemoryError:
        return {"error": "memory", "message": f"it needed more than the {MEMORY_BYTES >> 20} MiB it may use"}
    except Exception as e:  # noqa: BLE001 - a template can raise anything (OverflowError for a huge range(), ...)
        return {"error": "failed", "message": f"{type(e).__name__}: {e}"}


def serve() -> None:
    """The renderer process: one JSON request per line on stdin ({"template", "context", "max_chars",
    "cpu_seconds"}), one JSON answer per line on stdout ({"text"} or {"error", "message"}); ends at EOF."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(MEMORY_BYTES, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.signal(signal.SIGVTALRM, signal.SIG_DFL)  # the timer's signal ends the process
    environment()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        signal.setitimer(signal.ITIMER_VIRTUAL, float(request["cpu_seconds"]))
        answer = _answer(request)
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        try:
            text = json.dumps(answer)  # ASCII: no encoding between the processes to agree on
        except MemoryError:
            text = json.dumps({"error": "memory", "message": "its output did not fit in memory"})
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
