"""camelid.fileio: the checks shared by the commands that read a corpus and write a folder."""

from __future__ import annotations

import pytest

from camelid.errors import CamelidError
from camelid.fileio import check_output_folder, iter_jsonl, refuse_or_warn_empty, text_problem


@pytest.mark.parametrize("raw, problem", [
    ("Plain text, with an accent: café.\n".encode(), None),
    (b"tab\tand\r\nnewlines\x0c", None),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "NUL bytes"),
    ("Café".encode("latin-1") * 20, "is not UTF-8 text"),
    (b"\x1b\x02\x03" * 10 + b"text", "is not UTF-8 text"),
])
def test_text_problem(raw, problem) -> None:
    found = text_problem(raw)
    assert found is None if problem is None else problem in found


def test_an_output_folder_that_is_a_file(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    check_output_folder(tmp_path / "new" / "deeper")  # does not exist yet: fine
    for target in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(CamelidError, match=r"file: an existing file, not a folder; --out .* needs a folder"):
            check_output_folder(target)


def test_empty_files_are_refused_only_when_all_are(tmp_path, capsys) -> None:
    refuse_or_warn_empty([tmp_path / "a.txt"], 2)
    assert capsys.readouterr().err == f"camelid: warning: {tmp_path / 'a.txt'}: empty; it adds nothing to the corpus\n"
    with pytest.raises(CamelidError, match="a.txt: empty; there is no text to train on"):
        refuse_or_warn_empty([tmp_path / "a.txt"], 1)


def test_a_binary_jsonl_is_one_line(tmp_path) -> None:
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "fine"}\n\xff\xfe\x00garbage\n')
    with pytest.raises(CamelidError, match=r"x.jsonl:2: not UTF-8 text"):
        list(iter_jsonl(tmp_path / "x.jsonl", "fix it"))
