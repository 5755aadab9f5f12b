"""Every command's --help works, and every `camelid ...` its help text points to exists (commands and options)."""

from __future__ import annotations

from typing import Any

from cli_reference import check_words, command_tree, inline_commands
from typer.testing import CliRunner

from camelid.cli import app

runner = CliRunner()


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, cmd)]
    for name, sub in getattr(cmd, "commands", {}).items():
        found += _commands(sub, (*path, name))
    return found


def test_every_help_points_to_commands_and_options_that_exist() -> None:
    commands = _commands(command_tree())
    assert len(commands) > 20  # every command module registered
    problems = []
    for path, cmd in commands:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        texts = [cmd.help or "", *(getattr(p, "help", None) or "" for p in cmd.params)]
        for words in (w for text in texts for w in inline_commands(text)):
            if error := check_words(words):
                problems.append(f"camelid {' '.join(path)}: {error}")
    assert not problems, "\n".join(problems)


def test_info_help_names_the_configs_command() -> None:
    result = runner.invoke(app, ["info", "--help"])
    assert "camelid configs" in result.output and "--list" not in result.output
