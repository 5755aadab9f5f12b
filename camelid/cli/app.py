"""The `camelid` command: one typer app; each topic registers its commands from its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="camelid",
    help="The LLaMA family (and BERT beside it) in one readable PyTorch codebase.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
