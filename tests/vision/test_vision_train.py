"""`camelid vision train` through the shared training loop, on a tiny random text model: the checkpoint loads with
camelid.load and answers through the Python API and `camelid generate --image`; the text model is untouched;
a resumed run repeats an uninterrupted one exactly; damaged checkpoints are one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import camelid
from camelid import CamelidError
from camelid.formats import Format, detect
from camelid.train import load_config, train
from camelid.train.plot import read_log
from camelid.vision.data import heldout_set
from camelid.vision.image import to_pixels
from camelid.vision.model import VisionLlama
from camelid.vision.objective import VisionQA

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("step", "loss", "lr", "grad_norm", "val_loss", "val_acc", "val_seen_acc", "val_text_loss")


def settings(base: Path, out: Path, **extra: object) -> list[str]:
    sets = {"model.base": str(base), "model.vit": "{image_size: 16, patch_size: 4, dim: 32, n_layers: 1, n_heads: 2}",
            "model.every": 2, "model.cross_hidden": 64, "out": str(out), "batch_size": 8, "block_size": 40,
            "max_steps": 12, "lr": 3e-3, "warmup_steps": 2, "threads": 1, "eval_interval": 6, "eval_tokens": 0,
            "sample_interval": 6, "checkpoint_interval": 6, **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`camelid ARGS` in this process (quicker than a new one): (exit status, stdout, stderr)."""
    from camelid.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "camelid", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vision-run")
    r = run_cli("vision", "train", *[x for s in settings(tiny_base, out) for x in ("--set", s)], "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: 12 steps" in r.stdout and "exact match" in r.stdout
    return out


def test_the_run_writes_logs_plot_samples_and_a_loadable_model(trained: Path, tiny_base: Path) -> None:
    assert (trained / "loss.png").stat().st_size > 0 and "truth:" in (trained / "samples.txt").read_text()
    rows = read_log(trained / "log.csv")
    assert len(rows) == 12 and float(rows[-1]["loss"]) < float(rows[0]["loss"])
    evals = [r for r in rows if r["val_loss"]]
    assert len(evals) == 2 and evals[0]["val_text_loss"] == evals[1]["val_text_loss"]  # no image: unchanged
    spec = json.loads((trained / "hf" / "vision.json").read_text())
    assert spec["base"] == str(tiny_base) and spec["layers"] == [1, 3] and spec["fusion"] == "cross-attention"

    assert detect(trained / "hf") is Format.VISION
    llm = camelid.load(trained / "hf")
    assert isinstance(llm.model, VisionLlama) and llm.model.trainable_parameters() == spec["trainable_parameters"]
    assert any(c.attention_gate.item() != 0 for c in llm.model.cross)  # training opened the gates
    base = camelid.load(tiny_base)
    ids = torch.tensor([base.tokenizer.encode("What colour is the circle? It was a fine day.")])
    with torch.no_grad():
        assert torch.equal(llm.model(ids), base.model(ids))  # the text model, bit for bit, after training
    assert llm.generate("Once upon", max_new_tokens=8) == base.generate("Once upon", max_new_tokens=8)

    scene, q = heldout_set(1)[0]
    answer = llm.generate(q.question, image=scene.render(16), max_new_tokens=6)
    with llm.model.image(to_pixels(scene.render(16))):
        ids = llm.model.with_image_tokens(llm.encode_prompt(q.question))
        direct = camelid.generate(llm.model, ids, 6, stop_ids=llm.tokenizer.stop_ids)
    assert answer == llm.tokenizer.decode([i for i in direct if i not in llm.tokenizer.stop_ids])
    reply = llm.chat([{"role": "user", "content": q.question}], image=scene.render(16), max_new_tokens=6)
    assert reply == answer  # one question: the same prompt as generate


def test_generate_and_chat_take_an_image_on_the_command_line(trained: Path, tiny_base: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    scene, q = heldout_set(1)[0]
    scene.render(16).save(tmp_path / "scene.png")
    llm = camelid.load(trained / "hf")
    expected = llm.generate(q.question, image=tmp_path / "scene.png", max_new_tokens=6)
    r = run_cli("generate", "-m", str(trained / "hf"), "--image", str(tmp_path / "scene.png"), q.question, "-n", "6",
                "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(q.question + "\n"))  # one question, then end of input
    code, out, err = run_main(capsys, "chat", "-m", str(trained / "hf"), "--image", str(tmp_path / "scene.png"),
                              "-t", "0", "-n", "6")
    assert code == 0, err
    assert out == f">>> {expected}\n>>> "  # a one-question conversation: the same prompt as generate

    (tmp_path / "notes.txt").write_text("hello")
    for args, message in [
        (["-m", str(tiny_base), "--image", str(tmp_path / "scene.png")], "text-only model and cannot look"),
        (["-m", str(trained / "hf"), "--image", str(tmp_path / "notes.txt")], "not a picture"),
        (["-m", str(trained / "hf"), "--image", str(tmp_path / "nope.png")], "no such image file"),
    ]:
        code, _, err = run_main(capsys, "generate", *args, "What is this?", "-n", "2", "-q")
        assert code == 1 and err.count("\n") == 1 and message in err, err
    with pytest.raises(CamelidError, match="text-only model"):
        camelid.load(tiny_base).generate("Hi", image=tmp_path / "scene.png")


def test_resume_repeats_an_uninterrupted_run_exactly(tiny_base: Path, tmp_path: Path) -> None:
    """A run resumed from its step-6 checkpoint (the later one deleted, as if it had been killed) logs the very
    same floats for steps 7-12 and ends with the same weights."""
    import shutil

    from safetensors.torch import load_file

    args = ["objective=vision", "data=scenes", "model={}", *settings(tiny_base, tmp_path / "a", export="false")]
    full = train(load_config(None, args), progress=False, objective=VisionQA)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ckpts = tmp_path / "b" / "checkpoints"
    shutil.rmtree(ckpts / "step-000012")
    (ckpts / "latest").write_text("step-000006\n")
    resumed = train(load_config(None, [*args, f"out={tmp_path / 'b'}"]), resume=True, progress=False,
                    objective=VisionQA)
    assert resumed.final_loss == full.final_loss
    ref = [{k: r[k] for k in COMPARED} for r in read_log(tmp_path / "a" / "log.csv")]
    got = [{k: r[k] for k in COMPARED} for r in read_log(tmp_path / "b" / "log.csv")]
    assert len(got) == 12 and got == ref
    final = [load_file(o / "checkpoints" / "step-000012" / "model.safetensors") for o in (ckpts.parent, tmp_path / "a")]
    assert final[0].keys() == final[1].keys() and all(final[0][k].equal(final[1][k]) for k in final[0])
    assert (ckpts / "step-000012" / "model.safetensors").stat().st_size < 1_000_000  # the trained parts only


def test_damaged_or_mismatched_checkpoints_are_one_line_errors(trained: Path, tmp_path: Path) -> None:
    import shutil

    from camelid import Llama, LlamaConfig
    from camelid.interop.hf import save_hf_dir

    def copy(name: str) -> Path:
        return Path(shutil.copytree(trained / "hf", tmp_path / name))

    bad = copy("flipped")
    data = bytearray((bad / "vision.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "vision.safetensors").write_bytes(bytes(data))
    with pytest.raises(CamelidError, match="vision.safetensors: damaged"):  # the export's SHA256SUMS, first
        camelid.load(bad)
    (bad / "SHA256SUMS").unlink()
    with pytest.raises(CamelidError, match="do not match the sha256"):  # the vision checkpoint's own record
        camelid.load(bad)

    other = tmp_path / "other-base"
    save_hf_dir(Llama(LlamaConfig.from_name("tiny-mha", vocab_size=512, n_layers=4)), other)
    shutil.copyfile(Path(json.loads((trained / "hf" / "vision.json").read_text())["base"]) / "tokenizer.json",
                    other / "tokenizer.json")
    moved = copy("moved")
    (moved / "SHA256SUMS").unlink()  # edited on purpose, as the damage message advises
    spec = json.loads((moved / "vision.json").read_text())
    (moved / "vision.json").write_text(json.dumps({**spec, "base": str(other)}))
    with pytest.raises(CamelidError, match="n_kv_heads=2, but"):
        camelid.load(moved)

    broken = copy("broken")
    (broken / "SHA256SUMS").unlink()
    (broken / "vision.json").write_text("{not json")
    with pytest.raises(CamelidError, match="not JSON"):
        camelid.load(broken)


def test_projector_design_trains_and_answers(tiny_base: Path, tmp_path: Path) -> None:
    args = ["objective=vision", "data=scenes", "model={}", *settings(tiny_base, tmp_path, max_steps=4,
                                                                       eval_interval=0, sample_interval=0),
            "model.fusion=projector", "model.pixel_shuffle=2", "model.projector_hidden=32"]
    train(load_config(None, args), progress=False, objective=VisionQA)
    llm = camelid.load(tmp_path / "hf")
    assert llm.model.image_tokens == 4 and llm.model.projector is not None
    spec = json.loads((tmp_path / "hf" / "vision.json").read_text())
    assert spec["image_tokens"] == 4 and spec["fusion"] == "projector"
    scene, q = heldout_set(1)[0]
    stats: dict[str, float] = {}
    llm.generate(q.question, image=scene.render(16), max_new_tokens=3, stats=stats)
    assert stats["prompt_tokens"] == 4 + len(llm.encode_prompt(q.question))  # the image's tokens are context
    base = camelid.load(tiny_base)
    assert llm.generate("Once upon", max_new_tokens=6) == base.generate("Once upon", max_new_tokens=6)


def test_scenes_and_eval_commands(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "vision", "scenes", str(tmp_path / "pics"), "-n", "3", "--held-out", "--size", "16")
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "pics" / "questions.jsonl").read_text().splitlines()]
    assert len(lines) == 18 and all((tmp_path / "pics" / x["image"]).is_file() for x in lines)
    llm = camelid.load(trained / "hf")
    first = lines[0]
    assert llm.generate(first["question"], image=tmp_path / "pics" / first["image"], max_new_tokens=4) is not None
    code, out, err = run_main(capsys, "vision", "eval", str(trained / "hf"), "-n", "12", "--out",
                              str(tmp_path / "eval.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["questions"] == 12 and set(result["by_kind"]) == {"colour", "shape", "size", "position", "count",
                                                                       "caption"}
    assert result["speed"]["image_tokens"] == 0 and result["speed"]["decode_tok_s"] > 0
    assert "exact match" in out and "decode" in out
    code, _, err = run_main(capsys, "vision", "train", "--set", "objective=clm")
    assert code == 1 and "trains objective vision" in err
