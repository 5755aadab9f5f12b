"""Entry point of the `camelid` console script.

Each topic's commands live in their own module and register on the shared `app` when imported; add a
module to `COMMAND_MODULES` to add its commands.
"""

from __future__ import annotations

import importlib
import sys

from camelid.cli.app import app
from camelid.errors import CamelidError

COMMAND_MODULES = [
    "camelid.cli.info",
    "camelid.cli.bench",
    "camelid.cli.generate",
    "camelid.cli.models",
    "camelid.cli.tokenize",
    "camelid.cli.train",
    "camelid.cli.convert",
    "camelid.cli.bert",
    "camelid.cli.classify",
    "camelid.cli.compare",
    "camelid.cli.quantize",
    "camelid.cli.vision",
]


def main(argv: list[str] | None = None) -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name)
    try:
        app(args=argv, standalone_mode=True)
    except CamelidError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


__all__ = ["app", "main"]
