"""Fine-tuning data: the loss mask on SmolLM2's own chat template, the three record formats, bad input as one-line
errors, long examples never dropped silently, and packing (every example once per epoch, rows from the seed)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from camelid.errors import CamelidError
from camelid.finetune.config import FinetuneConfig
from camelid.finetune.data import (
    IGNORE,
    Example,
    RowStream,
    encode_chat,
    heldout_batches,
    load_sft_data,
    make_batch,
    mask_segments,
    show_mask,
)
from camelid.ops.attention import Documents
from camelid.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course.\nIt is old."},
]


def test_only_assistant_turns_and_their_end_of_turn_token_are_learned(smol: Tokenizer) -> None:
    ids, trained = encode_chat(smol, CONVERSATION, "test")
    learned = [text for text, learn in mask_segments(smol, Example(ids, trained, "test")) if learn]
    assert learned == ["Paris.<|im_end|>", "Rome, of course.\nIt is old.<|im_end|>"]
    end = smol.id_of("<|im_end|>")
    # every <|im_end|> closing an assistant turn is learned; those closing system and user turns are not
    assert [t for i, t in zip(ids, trained, strict=True) if i == end] == [False, False, True, False, True]
    # nothing of the scaffolding: the role headers and the newline after <|im_end|> carry no loss
    text = "".join(t for t, learn in mask_segments(smol, Example(ids, trained, "test")) if not learn)
    assert text.count("<|im_start|>assistant\n") == 2 and "Paris" not in text
    # the pieces tokenised one by one are the ids of the whole rendered conversation (boundaries at specials)
    assert ids == smol.encode(smol.apply_chat_template(CONVERSATION, add_generation_prompt=False))


def test_smollm2_default_system_prompt_is_never_learned(smol: Tokenizer) -> None:
    ids, trained = encode_chat(smol, CONVERSATION[1:3], "test")
    segments = mask_segments(smol, Example(ids, trained, "test"))
    assert "SmolLM" in segments[0][0] and not segments[0][1]  # the template's own system prompt
    assert [t for t, learn in segments if learn] == ["Paris.<|im_end|>"]


def _write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def _cfg(data: Path | str, **kw) -> FinetuneConfig:
    return FinetuneConfig(data=str(data), block_size=kw.pop("block_size", 256), **kw)


def test_instruction_records_with_a_field_mapping_and_splits(smol: Tokenizer, tmp_path: Path) -> None:
    rows = [{"prompt": f"Add {i} and 1.", "context": "" if i % 2 else f"({i})", "response": str(i + 1),
             "part": "train" if i < 8 else "dev"} for i in range(10)]
    data = _write_jsonl(tmp_path / "ni.jsonl.gz", rows, gz=True)
    cfg = _cfg(data, fields={"instruction": "prompt", "input": "context", "output": "response"}, split_field="part",
               system_prompt="Be brief.")
    sft = load_sft_data(cfg, smol)
    assert len(sft.train) == 8 and len(sft.val) == 2 and not sft.notes
    segments = mask_segments(smol, sft.train[0])
    assert [t for t, learn in segments if learn] == ["1<|im_end|>"]
    assert "Add 0 and 1.\n\n(0)" in segments[0][0] and "Be brief." in segments[0][0]


def test_val_examples_keeps_a_seeded_sample_of_the_held_out_records(smol: Tokenizer, tmp_path: Path) -> None:
    rows = [{"instruction": f"Say {i}.", "output": str(i), "split": "train" if i < 4 else "dev"} for i in range(30)]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    picks = [[ex.where for ex in load_sft_data(_cfg(data, val_examples=5, seed=seed), smol).val] for seed in (0, 0, 1)]
    assert len(picks[0]) == 5 and picks[0] == picks[1] != picks[2]
    lines = [int(w.rsplit(":", 1)[1]) for w in picks[0]]
    assert lines == sorted(lines) and min(lines) > 4  # in file order, dev records only
    assert len(load_sft_data(_cfg(data), smol).val) == 26
    with pytest.raises(CamelidError, match="val_examples must be"):
        _cfg(data, val_examples=-1).validate()


def test_text_records_learn_every_token_and_long_texts_are_cut_into_windows(smol: Tokenizer, tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 300}, {"text": "short"}])
    sft = load_sft_data(_cfg(data, block_size=64, data_format="text"), smol)
    assert all(all(ex.trained) for ex in sft.train)
    assert max(len(ex.ids) for ex in sft.train) == 65 and len(sft.train) > 4
    assert sft.notes == ["1 training texts longer than 65 tokens were cut into windows"]


@pytest.mark.parametrize("how", ["drop", "truncate"])
def test_long_examples_are_dropped_or_truncated_and_reported(smol: Tokenizer, tmp_path: Path, how: str) -> None:
    rows = [{"instruction": "Repeat.", "output": "la " * 200}, {"instruction": "Hi", "output": "Hello"}]
    sft = load_sft_data(_cfg(_write_jsonl(tmp_path / "d.jsonl", rows), block_size=64, long_examples=how), smol)
    assert len(sft.train) == (1 if how == "drop" else 2)
    assert len(sft.notes) == 1 and sft.notes[0].startswith("1 training examples longer than 65 tokens were" if how ==
                                                           "drop" else "1 training examples were truncated to 65")


@pytest.mark.parametrize("content, message", [
    ("", r"empty file; it holds no examples"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"d\.jsonl:1: no assistant turn"),
    ('{"instruction": "hi", "output": ""}\n', r"d\.jsonl:1: no assistant turn: 'output' is missing or empty"),
    ('{"instruction": "hi", "output": "yo"}\n{oops\n', r"d\.jsonl:2: not valid JSON"),
    ('{"question": "hi"}\n', r"d\.jsonl:1: cannot tell the format of this record \(keys \['question'\]\)"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}\n', r"d\.jsonl:1: message 0 must be"),
])
def test_bad_data_is_a_one_line_error_naming_the_file(smol: Tokenizer, tmp_path: Path, content: str,
                                                      message: str) -> None:
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(CamelidError, match=message) as e:
        load_sft_data(_cfg(tmp_path / "d.jsonl"), smol)
    assert "\n" not in str(e.value)


def test_no_file_and_an_unknown_split_are_one_line_errors(smol: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(CamelidError, match="no such file"):
        load_sft_data(_cfg(tmp_path / "missing.jsonl"), smol)
    data = _write_jsonl(tmp_path / "s.jsonl", [{"instruction": "a", "output": "b", "split": "test"}])
    with pytest.raises(CamelidError, match=r"no records with split = 'train' \(found test\); set train_split"):
        load_sft_data(_cfg(data), smol)


def test_show_mask_marks_the_learned_tokens(smol: Tokenizer) -> None:
    ids, trained = encode_chat(smol, CONVERSATION[1:3], "x")
    text = show_mask(smol, Example(ids, trained, "x"))
    assert text.endswith("<|im_start|>assistant\n«Paris.<|im_end|>»\n")
    assert show_mask(smol, Example(ids, trained, "x"), color=True).plain == text.replace("«", "").replace("»", "")


# ---------------------------------------------------------------------------------------------------
# packing


def _examples(lengths: list[int]) -> list[Example]:
    return [Example(list(range(1, n + 1)), [False] + [True] * (n - 1), f"ex{i}") for i, n in enumerate(lengths)]


def test_rows_hold_every_example_once_per_epoch_and_depend_on_the_seed_alone() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 120, (500,), generator=g).tolist()
    stream = RowStream(_examples(lengths), block_size=128, packing=True, seed=3)
    for epoch in (0, 1):
        rows = stream.epoch_rows(epoch)
        assert sorted(i for row in rows for i in row) == list(range(500))
        assert all(sum(lengths[i] - 1 for i in row) <= 128 for row in rows)
    assert stream.epoch_rows(0) != stream.epoch_rows(1)
    assert stream.fill() > 0.95
    again = RowStream(_examples(lengths), block_size=128, packing=True, seed=3)
    n0 = stream.rows_per_epoch(0)
    assert again.rows(n0 - 2, 4) == stream.epoch_rows(0)[-2:] + stream.epoch_rows(1)[:2]  # across the epoch
    unpacked = RowStream(_examples(lengths), block_size=128, packing=False, seed=3)
    assert unpacked.rows_per_epoch() == 500


def test_a_batch_restarts_positions_per_example_and_ignores_padding() -> None:
    exs = _examples([4, 3, 6])
    b = make_batch(exs, [[0, 1], [2]], pad_id=0)
    assert b.documents == Documents(((3, 2), (5,)))
    assert b.input_ids.tolist() == [[1, 2, 3, 1, 2], [1, 2, 3, 4, 5]]
    assert b.targets.tolist() == [[2, 3, 4, 2, 3], [2, 3, 4, 5, 6]]
    assert b.documents.positions().tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    b = make_batch(exs, [[1], [2]], pad_id=0)  # a short row: one padding document after the example
    assert b.documents == Documents(((2, 3), (5,))) and b.tokens == 7 and b.n_trained == 7
    assert b.targets[0, 2:].tolist() == [IGNORE] * 3
    mask = b.documents.mask()[0, 0]
    assert mask[2:, :2].sum() == 0 and mask[:2, 2:].sum() == 0  # the padding and the example never meet
    assert len(list(heldout_batches(exs, 8, 1, 0))) == 2
