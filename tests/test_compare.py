"""camelid compare: prompt scoring against transformers, the bootstrap verdict on constructed predictions, and
every arm end to end on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from camelid import CamelidError
from camelid.classify import load_llm
from camelid.cli import main
from camelid.compare import (
    ARMS,
    CompareArgs,
    PromptClassifier,
    label_words_records,
    load_split,
    markdown_table,
    paired_bootstrap,
    pick_shots,
    run_compare,
    verdict,
)


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


def test_paired_bootstrap_on_constructed_predictions():
    n = 100
    same = [1] * 60 + [0] * 40
    assert paired_bootstrap(same, same) == (0.0, 0.0, 0.0)  # identical answers: no difference in any resample
    assert paired_bootstrap([1] * n, [0] * n) == (1.0, 1.0, 1.0)
    # better on one example of 100: the resamples without it (37% of them) differ by 0, so the interval starts at 0
    one = [1] + [0] * 99
    diff, lo, hi = paired_bootstrap(one, [0] * n)
    assert diff == 0.01 and lo == 0.0 and 0.02 <= hi <= 0.05
    # better on 30, worse on none: every resample favours it
    diff, lo, hi = paired_bootstrap([1] * 30 + [0] * 70, [0] * n)
    assert diff == 0.3 and 0.15 < lo < 0.3 < hi < 0.45
    # only the paired differences matter: the same discordant examples give the same interval
    a, b = [1] * 10 + [0] * 5 + [1] * 85, [0] * 10 + [1] * 5 + [1] * 85
    c, d = [1] * 10 + [0] * 5 + [0] * 85, [0] * 10 + [1] * 5 + [0] * 85
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(c, d, seed=3)
    with pytest.raises(CamelidError, match="same"):
        paired_bootstrap([1, 0], [1, 0, 1])


def _result(arm, correct, **extra):
    acc = sum(correct) / len(correct)
    return {"arm": arm, "accuracy": acc, "macro_f1": acc, "correct": correct, "train_seconds": 1.0,
            "latency_ms": 2.0, "throughput_per_s": 3.0, "peak_rss_mib": 100.0, **extra}


def test_verdict_calls_a_difference_within_noise_a_tie():
    n = 100
    best = _result("bert-finetune", [1] * 90 + [0] * 10)
    close = _result("llm-probe", [1] * 89 + [0] * 11)  # one example apart
    far = _result("llm-zeroshot", [1] * 30 + [0] * 70)
    v = verdict([close, best, far])
    assert v["best"] == "bert-finetune" and v["test_examples"] == n
    by_arm = {o["arm"]: o for o in v["others"]}
    assert by_arm["llm-probe"]["tie"] and by_arm["llm-probe"]["low"] == 0.0
    assert not by_arm["llm-zeroshot"]["tie"] and by_arm["llm-zeroshot"]["diff"] == 0.6
    assert "Within noise of it (a tie" in v["text"] and "llm-probe (-0.010" in v["text"]
    assert "Below it beyond noise: llm-zeroshot (-0.600" in v["text"]
    # equal accuracy: the first arm is named best, the other ties with it at a difference of exactly 0
    v = verdict([best, _result("llm-finetune", [0] + [1] * 90 + [0] * 9)])
    assert v["best"] == "bert-finetune" and v["others"][0]["diff"] == 0.0 and v["others"][0]["tie"]


def test_table_reports_the_chosen_learning_rate_and_epochs():
    tuned = {"lr": 1e-4, "epochs": 2.0, "max_epochs": 4, "dev_loss": 0.1234}
    rows = [_result("bert-finetune", [1] * 9 + [0], **tuned), _result("llm-zeroshot", [0] * 9 + [1])]
    table = markdown_table(rows).splitlines()
    assert "| vs best (95% CI) | lr | epochs | dev loss |" in table[0]
    assert table[2].startswith("| bert-finetune | 0.900 | 0.900 | best | 0.0001 | 2 / 4 | 0.123 |")
    assert table[3].startswith("| llm-zeroshot | 0.100 | 0.100 | -0.800 [") and "| - | - | - |" in table[3]


def test_label_word_records_answer_the_zero_shot_prompt(tiny_llama_dir, jsonl, data):
    model, tok = load_llm(tiny_llama_dir)
    whole = load_split(CompareArgs(data=str(jsonl), max_dev=0))
    assert len(whole.train) + len(whole.dev) == 90  # no dev split in the file: 15% of train becomes dev
    assert 10 <= len(whole.dev) <= 16
    assert sorted(e.text for e in whole.train + whole.dev) == sorted(e.text for e in data[0])
    split = load_split(CompareArgs(data=str(jsonl), max_dev=9))
    assert len(split.dev) == 9 and split.train == whole.train
    clf = PromptClassifier(model, tok, split.labels)
    rec = label_words_records(clf, split.train[:2], "train")[0]
    user, answer = rec["messages"]
    assert user == {"role": "user", "content": clf.prompt(split.train[0].text)} and rec["split"] == "train"
    assert answer["content"] == f"Category: {split.train[0].label}"


@pytest.mark.slow
def test_all_arms_end_to_end(tiny_llama_dir, tiny_bert_dir, jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = CompareArgs(data=str(jsonl), bert=str(tiny_bert_dir), llm=str(tiny_llama_dir), k_shot=3, max_test=15,
                       max_dev=12, epochs=20, patience=3, bert_lr=[1e-3, 3e-3], llm_lr=[3e-3], probe_lr=[1e-2],
                       lora_lr=[3e-3], lora_rank=2, batch_size=8, max_len=64, bootstrap=1000)
    results = run_compare(args, tmp_path / "out", quiet=True)  # one subprocess per arm
    assert [r["arm"] for r in results] == list(ARMS)
    by_arm = {r["arm"]: r for r in results}
    for r in results:
        assert r["test_examples"] == 15 and 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
        assert r["latency_ms"] > 0 and r["throughput_per_s"] > 0 and r["peak_rss_mib"] > 50
        assert len(r["correct"]) == 15 and sum(r["correct"]) == round(15 * r["accuracy"])
    assert by_arm["bert-finetune"]["accuracy"] >= 0.8  # the cue words are easy to learn
    assert by_arm["llm-zeroshot"]["params_trainable"] == 0 and by_arm["llm-kshot"]["train_examples"] == 3
    for arm in ("bert-finetune", "llm-probe", "llm-finetune", "llm-lora-head", "llm-lora-words"):
        r = by_arm[arm]
        assert r["dev_examples"] == 12 and r["lr"] in [t["lr"] for t in r["trials"]]
        assert r["dev_loss"] == min(t["dev_loss"] for t in r["trials"]) and 0 < r["epochs"] <= r["max_epochs"]
    assert len(by_arm["bert-finetune"]["trials"]) == 2 and by_arm["llm-probe"]["max_epochs"] == 20
    probe, ft, lora = by_arm["llm-probe"], by_arm["llm-finetune"], by_arm["llm-lora-head"]
    assert probe["params_total"] == ft["params_total"] and probe["params_trainable"] < ft["params_trainable"]
    assert ft["params_trainable"] == ft["params_total"]
    # LoRA: rank 2 on 7 linears of 2 blocks (dim 64, hidden 176), and the head (64 x 3 + 3)
    adapters = 2 * 2 * (4 * (64 + 64) + 3 * (64 + 176))
    assert lora["params_trainable"] == adapters + 64 * 3 + 3 and lora["params_total"] == ft["params_total"] + adapters
    words = by_arm["llm-lora-words"]
    assert words["params_trainable"] == adapters and words["train_examples"] == len(load_split(args).train)
    assert (tmp_path / "out" / "runs" / "llm-lora-words" / "lr-0.003" / "adapter" / "adapter_config.json").is_file()
    table = (tmp_path / "out" / "compare.md").read_text()
    assert table.count("\n| ") == len(ARMS) + 1 and markdown_table(results, 1000) in table
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert report["results"] == results and report["verdict"]["text"] in table
    assert report["verdict"] == verdict(results, 1000)
    assert (tmp_path / "out" / "compare.png").stat().st_size > 5000


def test_cli_and_errors(tiny_llama_dir, tiny_bert_dir, jsonl, tmp_path, capsys):
    with pytest.raises(CamelidError, match="unknown arm"):
        run_compare(CompareArgs(data=str(jsonl), arms=["gpt-5"]))
    with pytest.raises(SystemExit) as e:
        main(["compare", "--data", str(tmp_path / "missing.jsonl")])
    assert e.value.code == 1 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compare", "--data", str(jsonl), "--bert-lr", "1e-4,fast"])
    assert e.value.code == 1 and "--bert-lr takes positive learning rates" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["compare", "--data", str(jsonl), "--bert", str(tiny_bert_dir), "--llm", str(tiny_llama_dir),
              "--arms", "llm-zeroshot,llm-kshot", "--k-shot", "1", "--max-test", "6", "--out", str(tmp_path / "o")])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "| llm-zeroshot |" in out and "| llm-kshot |" in out and "Most accurate: " in out
