"""The examples in README.md and docs/*.md run as written and do what they say.

Every fenced shell (bash, sh, shell, console) or Python block in README.md and docs/*.md carries a marker: one
or more HTML comments (GitHub does not show them) on the lines just above its opening fence:

    <!-- test: run -->              run it: test_example[PAGE:LINE]
    <!-- test: run slow -->         run it in the slow tier (@pytest.mark.slow; CI runs that too)
    <!-- test: skip -- REASON -->   never run it, for the reason given (it needs 8 processes, a GPU, an hour)
    <!-- test: ci -->               the README's test command: test_ci_runs_the_readme_test_command checks that
                                    .ci/run runs these lines, as written and in order

and, with run, as many of these as needed:

    <!-- test: sub OLD => NEW -->   replace the text OLD by NEW before running: fewer steps, a smaller data set,
                                    so that the example tests the commands without repeating a long measurement
    <!-- test: expect REGEX -->     what the example prints on stdout must match REGEX (re.search)
    <!-- test: after LINE -->       a line appended to the example, e.g. an assert on a value it computed

A block in another language (a YAML config, say) marked `<!-- test: file NAME -->` is written to NAME in the
page's folder before its examples run, so that they can use it as a reader would.

How examples run: the blocks of one page run in order in one fresh folder per page, which holds a copy of
the repository's data/, examples/ and benchmarks/, so a block can use what an earlier one wrote (run alone with
-k, a block first runs the blocks above it). Shell blocks run under `bash -euxo pipefail`, Python blocks with
this interpreter, both with this environment's `camelid` first on PATH. Lines that create or activate a
virtual environment or install with pip are left out: the suite runs inside the environment they make, and
.ci/run runs the README's test command itself. Models come from the usual cache ($CAMELID_CACHE).

Besides running them: every `camelid ...` command the docs write (in any block, or as inline code) must name
a command and options that exist, and the docs describe the software, not how it came to be.

`python tests/test_docs.py` lists every block with its marker (what the checks see).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_reference import camelid_invocations, check_words, inline_commands, shell_lines

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL, PYTHON = {"bash", "sh", "shell", "console"}, {"python", "py"}
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->$")
SETUP_LINE = re.compile(r"^\s*(python3? -m venv |\. \.venv/bin/activate|pip install )")
LOOKS_LIKE_COMMANDS = re.compile(r"^(\$ )?(camelid|python3?|pip|torchrun|OMP_NUM_THREADS=\S+|nice)\s")
TIMEOUT_S = 1800  # per block; a busy 2-core machine is slow, a hung example still ends


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    mode: str | None = None  # run | slow | skip | ci | file
    reason: str = ""
    file: str = ""
    subs: list[tuple[str, str]] = field(default_factory=list)
    expect: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def is_example(self) -> bool:
        return self.lang in SHELL | PYTHON

    def directive(self, text: str) -> None:
        word, _, rest = text.partition(" ")
        rest = rest.strip()
        if word in ("run", "skip", "ci", "file"):
            if self.mode is not None:
                self.errors.append(f"two markers ({self.mode} and {word})")
            if word == "run":
                self.mode = {"": "run", "slow": "slow"}.get(rest)
                if self.mode is None:
                    self.errors.append(f"`run {rest}`: write `run` or `run slow`")
            elif word == "skip":
                self.mode, self.reason = "skip", rest.removeprefix("--").strip()
                if not self.reason:
                    self.errors.append("`skip` needs a reason: <!-- test: skip -- REASON -->")
            elif word == "file":
                self.mode, self.file = "file", rest
            else:
                self.mode = "ci"
        elif word == "sub":
            old, sep, new = rest.partition(" => ")
            if not sep or not old:
                self.errors.append(f"`sub {rest}`: write sub OLD => NEW")
            self.subs.append((old, new))
        elif word == "expect":
            self.expect.append(rest)
        elif word == "after":
            self.after.append(rest)
        else:
            self.errors.append(f"unknown marker `{text}` (run, run slow, skip -- REASON, ci, file NAME, sub, "
                               "expect, after)")

    def script(self) -> str:
        """What runs: the block with its substitutions, without setup lines, and with its `after` lines."""
        text = self.text
        for old, new in self.subs:
            text = text.replace(old, new)
        if self.lang in SHELL:
            lines = [line for line in text.splitlines() if not SETUP_LINE.match(line)]
            return "set -euxo pipefail\n" + "\n".join(lines + self.after) + "\n"
        return text + "\n" + "\n".join(self.after) + "\n"


def parse_page(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != fence:
            end += 1
        block = Block(page, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n")
        markers, k = [], i - 1
        while k >= 0 and (not lines[k].strip() or MARKER.match(lines[k].strip())):
            if lines[k].strip():
                markers.append(MARKER.match(lines[k].strip()).group(1))
            k -= 1
        for text in reversed(markers):
            block.directive(text)
        if (block.subs or block.expect or block.after) and block.mode not in ("run", "slow"):
            block.errors.append("sub/expect/after apply to examples marked run")
        blocks.append(block)
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in parse_page(page)]
RUNNABLE = [b for b in BLOCKS if b.mode in ("run", "slow")]


def test_every_example_is_marked() -> None:
    """A new example cannot slip in untested by accident: it is run, or skipped with a reason."""
    problems = []
    for b in BLOCKS:
        problems += [f"{b.id}: {e}" for e in b.errors]
        if b.is_example and b.mode not in ("run", "slow", "skip", "ci"):
            problems.append(f"{b.id}: a {b.lang} example without a marker; add <!-- test: run --> (or run slow, "
                            "or skip -- REASON) above it (see tests/test_docs.py)")
        if not b.lang and LOOKS_LIKE_COMMANDS.match(b.text.lstrip()):
            problems.append(f"{b.id}: commands in a block without a language; write ```bash")
        if b.mode == "file" and (b.is_example or not b.file):
            problems.append(f"{b.id}: `file NAME` is for a config block (yaml, toml), and needs the NAME")
        problems += [f"{b.id}: `sub {old} => ...`: {old!r} is not in the block" for old, _ in b.subs
                     if old not in b.text]
    assert not problems, "\n".join(problems)
    assert len(RUNNABLE) >= 10  # the parser found the marked examples


_pages: dict[Path, tuple[Path, set[int]]] = {}


def _page_folder(page: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[int]]:
    """The folder a page's examples run in (a copy of data/, examples/, benchmarks/), and the blocks run there."""
    if page not in _pages:
        folder = tmp_path_factory.mktemp(f"docs-{page.stem}")
        for name in ("data", "examples", "benchmarks"):
            shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        for b in BLOCKS:
            if b.page == page and b.mode == "file":
                (folder / b.file).write_text(b.text, encoding="utf-8")
        _pages[page] = (folder, set())
    return _pages[page]


def _run(block: Block, folder: Path) -> None:
    script = folder / f"example-{block.line}.{'sh' if block.lang in SHELL else 'py'}"
    script.write_text(block.script(), encoding="utf-8")
    command = ["bash", str(script)] if block.lang in SHELL else [sys.executable, str(script)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, cwd=folder, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    shown = f"\n--- the example as run ---\n{block.script()}--- stdout ---\n{proc.stdout[-4000:]}" \
            f"--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"{block.id} failed (exit status {proc.returncode}){shown}"
    for pattern in block.expect:
        assert re.search(pattern, proc.stdout), f"{block.id}: stdout does not match {pattern!r}{shown}"


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.mode == "slow" else [])
                                   for b in RUNNABLE])
def test_example(block: Block, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder, ran = _page_folder(block.page, tmp_path_factory)
    for earlier in RUNNABLE:  # what this block may build on, when it runs alone
        if earlier.page == block.page and earlier.line < block.line and earlier.line not in ran:
            _run(earlier, folder)
            ran.add(earlier.line)
    _run(block, folder)
    ran.add(block.line)


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run is the README's test command on a clean clone: every line of the block, as written, in order."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    blocks = [b for b in BLOCKS if b.mode == "ci"]
    assert [b.page.name for b in blocks] == ["README.md"], "README.md needs one block marked <!-- test: ci -->"
    at = -1
    for line in filter(None, (line.strip() for line in blocks[0].text.splitlines())):
        assert line in ci[at + 1:], f".ci/run does not run the README's {line!r} (after its line {at + 1})"
        at = ci.index(line, at + 1)


def test_documented_commands_name_real_commands_and_options() -> None:
    """Every `camelid ...` line in a block, and every inline `camelid ...`, names a command and options that
    exist (benchmarks/README.md too)."""
    problems = []
    for page in [*PAGES, ROOT / "benchmarks" / "README.md"]:
        blocks = parse_page(page)
        for b in blocks:
            if b.lang in SHELL or not b.lang:
                for line in shell_lines(b.text):
                    problems += [f"{b.id}: {e}" for words in camelid_invocations(line) if (e := check_words(words))]
        prose = page.read_text(encoding="utf-8")
        for b in blocks:
            prose = prose.replace(b.text, "")
        problems += [f"{page.relative_to(ROOT)}: {e}" for words in inline_commands(prose) if (e := check_words(words))]
    assert not problems, "\n".join(problems)


HISTORY = re.compile(r"\b(this stop|last stop|next stop|the seeds'|seeds' question|previously|used to be|"
                     r"in this session|earlier in the day|this time round)\b", re.IGNORECASE)


def test_docs_describe_the_software_not_its_history() -> None:
    found = [f"{page.relative_to(ROOT)}:{n}: {line.strip()}" for page in PAGES
             for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1) if HISTORY.search(line)]
    assert not found, "\n".join(found)


if __name__ == "__main__":
    for b in BLOCKS:
        if b.is_example or b.mode:
            print(f"{b.id:28} {b.lang or '-':8} {b.mode or 'UNMARKED':8} {b.reason or b.file}")
