"""Checking `camelid ...` command lines written in docs and help texts against the real command tree: every
command and subcommand exists, and so does every option given to it."""

from __future__ import annotations

import importlib
import re
import shlex
from functools import cache
from typing import Any

# words that may come before `camelid` on a command line without being part of it
PREFIX_WORDS = {"nice", "-n", "19", "time", "env", "exec"}
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


@cache
def command_tree() -> Any:
    """The `camelid` command as click sees it (typer's own copy of click: groups have `.commands`), every
    command module registered."""
    import typer.main

    from camelid.cli import COMMAND_MODULES, app

    for name in COMMAND_MODULES:
        importlib.import_module(name)
    return typer.main.get_command(app)


def check_words(words: list[str]) -> str | None:
    """The words after `camelid` on one command line -> None, or what is wrong with them."""
    cmd, path, i = command_tree(), ["camelid"], 0
    while hasattr(cmd, "commands") and i < len(words) and not words[i].startswith("-"):
        sub = cmd.commands.get(words[i])
        if sub is None:
            return f"`{' '.join(path)} {words[i]}`: no such command (known: {', '.join(sorted(cmd.commands))})"
        cmd, path, i = sub, [*path, words[i]], i + 1
    options = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")} | {"--help"}
    for word in words[i:]:
        word = word.strip("[]()")
        name = word.split("=", 1)[0]
        if re.fullmatch(r"--[a-z][\w-]*|-[a-zA-Z]", name) and name not in options:
            return f"`{' '.join(path)} {name}`: no such option (known: {', '.join(sorted(options))})"
    return None


def camelid_invocations(line: str) -> list[list[str]]:
    """The argument lists of every `camelid ...` (or `python -m camelid ...`) invocation on one shell line."""
    line = re.sub(r"(^|\s)#.*$", "", line)  # a comment
    found = []
    for segment in re.split(r"\|\||&&|[|;]", line):
        try:
            words = shlex.split(segment)
        except ValueError:  # unbalanced quotes in prose: not a command line
            continue
        for j, word in enumerate(words):
            if word != "camelid":
                continue
            before = words[:j]
            if (before and before[-1] == "-m") or all(w in PREFIX_WORDS or ENV_ASSIGNMENT.match(w) for w in before):
                found.append(words[j + 1:])
                break
    return found


def shell_lines(text: str) -> list[str]:
    """A shell block's logical lines (backslash continuations joined)."""
    return text.replace("\\\n", " ").splitlines()


INLINE_CODE = re.compile(r"`([^`\n]+)`")


def inline_commands(prose: str) -> list[list[str]]:
    """`camelid ...` invocations written as inline code in prose or help text."""
    found = []
    for span in INLINE_CODE.findall(prose):
        if re.match(r"\s*(?:python3? -m )?camelid\s+\S", span):
            found.extend(camelid_invocations(span))
    return found
