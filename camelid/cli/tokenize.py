"""`camelid tokenize TEXT`: the ids and pieces a model's tokenizer gives a text (optionally as a chat prompt)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from camelid.cli.app import app
from camelid.hub import DEFAULT_MODEL


@app.command()
def tokenize(
    text: str = typer.Argument(..., help="The text to tokenise (special tokens such as <|im_start|> are parsed)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="A model name, GGUF file, tokenizer file or model folder."),
    chat: bool = typer.Option(False, "--chat", help="Wrap TEXT as a user message in the model's chat template."),
    system: str | None = typer.Option(None, "--system", help="A system message (with --chat)."),
    bos: bool = typer.Option(False, "--bos", help="Add BOS in front (as the model does when it adds one)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Token ids, vocabulary pieces and text of each token."""
    from camelid.tokenizer import Tokenizer

    tok = Tokenizer.load(model)
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(text, add_bos=bos)
    pieces = [tok.token_to_piece(i) for i in ids]
    if as_json:
        print(json.dumps({"text": text, "ids": ids, "pieces": pieces, "special": [i in tok.special_tokens.values()
                                                                                 for i in ids]}, ensure_ascii=False))
        return
    table = Table(title=f"{len(ids)} tokens ({tok.kind}, vocabulary {tok.vocab_size:,})")
    for column in ("#", "id", "piece", "text"):
        table.add_column(column, justify="right" if column in ("#", "id") else "left")
    for n, (i, piece) in enumerate(zip(ids, pieces, strict=True)):
        table.add_row(str(n), str(i), piece, repr(tok.decode([i])))
    Console().print(table)
