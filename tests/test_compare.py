"""camelid compare: prompt scoring against transformers, and every arm end to end on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from camelid import CamelidError
from camelid.classify import load_llm
from camelid.cli import main
from camelid.compare import ARMS, CompareArgs, PromptClassifier, markdown_table, pick_shots, run_compare


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(cue_examples):
    return cue_examples


@pytest.fixture()
def jsonl(tmp_path, data):
    f = tmp_path / "d.jsonl"
    rows = [{"text": e.text, "label": e.label, "split": "train"} for e in data[0]]
    rows += [{"text": e.text, "label": e.label, "split": "test"} for e in data[1]]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_label_scores_match_transformers(tiny_llama_dir, data):
    model, tok = load_llm(tiny_llama_dir)
    labels = ["pos", "neg", "neu"]
    shots = pick_shots(data[0], labels, 3)
    assert sorted(s.label for s in shots) == sorted(labels)
    clf = PromptClassifier(model, tok, labels, shots)
    text = data[1][0].text
    prompt = clf.prompt(text)
    assert prompt.count("Category:") == 4 and all(s.text in prompt for s in shots)
    ref = transformers.LlamaForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    ids = clf.prompt_ids(text)
    expected = []
    with torch.no_grad():
        for lab in clf.label_ids:
            logp = torch.log_softmax(ref(torch.tensor([ids + lab])).logits[0].float(), -1)
            expected.append(torch.stack([logp[len(ids) - 1 + j, t] for j, t in enumerate(lab)]).mean())
        got = clf.scores(text)
    assert (got - torch.stack(expected)).abs().max() < 1e-4


@pytest.mark.slow
def test_all_arms_end_to_end(tiny_llama_dir, tiny_bert_dir, jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = CompareArgs(data=str(jsonl), bert=str(tiny_bert_dir), llm=str(tiny_llama_dir), k_shot=3, max_test=15,
                       epochs=20, bert_lr=1e-3, llm_lr=3e-3, batch_size=8, max_len=64)
    results = run_compare(args, tmp_path / "out", quiet=True)  # one subprocess per arm
    assert [r["arm"] for r in results] == list(ARMS)
    by_arm = {r["arm"]: r for r in results}
    for r in results:
        assert r["test_examples"] == 15 and 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
        assert r["latency_ms"] > 0 and r["throughput_per_s"] > 0 and r["peak_rss_mib"] > 50
    assert by_arm["bert-finetune"]["accuracy"] >= 0.8  # the cue words are easy to learn
    assert by_arm["llm-zeroshot"]["params_trainable"] == 0 and by_arm["llm-kshot"]["train_examples"] == 3
    probe, ft = by_arm["llm-probe"], by_arm["llm-finetune"]
    assert probe["params_total"] == ft["params_total"] and probe["params_trainable"] < ft["params_trainable"]
    assert ft["params_trainable"] == ft["params_total"]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert table.count("\n| ") == len(ARMS) + 1 and markdown_table(results) in table
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["results"] == results
    assert (tmp_path / "out" / "compare.png").stat().st_size > 5000


def test_cli_and_errors(tiny_llama_dir, tiny_bert_dir, jsonl, tmp_path, capsys):
    with pytest.raises(CamelidError, match="unknown arm"):
        run_compare(CompareArgs(data=str(jsonl), arms=["gpt-5"]))
    with pytest.raises(SystemExit) as e:
        main(["compare", "--data", str(tmp_path / "missing.jsonl")])
    assert e.value.code == 1 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compare", "--data", str(jsonl), "--bert", str(tiny_bert_dir), "--llm", str(tiny_llama_dir),
              "--arms", "llm-zeroshot", "--max-test", "6", "--out", str(tmp_path / "o")])
    assert e.value.code == 0
    assert "| llm-zeroshot |" in capsys.readouterr().out
