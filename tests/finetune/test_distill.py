"""Distillation: forward KL, reverse KL and generalised JSD with a temperature equal trl's GKD loss (values and
gradients); a top-k cache holding every token equals the full distribution; the sampled cache's loss and gradient
average to full forward KL's; a fresh student learns from a live teacher and from the caches `camelid
teacher-cache` writes; another vocabulary, a stale, mismatched or damaged cache are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from camelid.cli import COMMAND_MODULES, app
from camelid.errors import CamelidError
from camelid.finetune import FinetuneConfig
from camelid.finetune.distill import KD, SampledTeacher, distill, distill_loss, gather_sampled, sample_teacher
from camelid.train.plot import read_log

for _m in COMMAND_MODULES:
    __import__(_m)

STUDENT = {"preset": "tiny-mha", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "intermediate_size": 128,
           "max_seq_len": 256}


def settings(base: Path, data: Path, out: Path, **extra: object) -> dict[str, object]:
    return {"objective": "kd", "teacher": str(base), "student": dict(STUDENT), "model": str(base),
            "data": str(data), "out": str(out), "block_size": 128, "batch_size": 2, "max_steps": 6, "lr": 3e-3,
            "min_lr": 3e-4, "warmup_steps": 1, "eval_interval": 3, "checkpoint_interval": 3, "threads": 1,
            "val_examples": 8, **extra}


@pytest.mark.parametrize(("kind", "beta", "temperature"), [("forward_kl", 0.0, 1.0), ("reverse_kl", 1.0, 2.0),
                                                           ("jsd", 0.3, 1.5)])
def test_losses_and_gradients_equal_trl_gkd(kind: str, beta: float, temperature: float) -> None:
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    g = torch.Generator().manual_seed(1)
    student = (3 * torch.randn(1, 7, 50, generator=g, dtype=torch.float64))
    teacher = 3 * torch.randn(1, 7, 50, generator=g, dtype=torch.float64)
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    ours = distill_loss(a[0], teacher[0], kind, beta if kind == "jsd" else 0.5, temperature).mean()
    theirs = gkd.GKDTrainer.generalized_jsd_loss(b, teacher, torch.zeros(1, 7, dtype=torch.long), beta=beta,
                                                 temperature=temperature)  # labels: every position counts
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-5, atol=1e-7)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_a_topk_holding_every_token_equals_the_full_distribution(kind: str) -> None:
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(5, 30, generator=g), torch.randn(5, 30, generator=g)
    top = teacher.topk(30, -1)
    torch.testing.assert_close(distill_loss(student, (top.values, top.indices), kind, 0.4, 2.0),
                               distill_loss(student, teacher, kind, 0.4, 2.0), rtol=1e-5, atol=1e-6)
    few = teacher.topk(5, -1)  # fewer tokens: a different (finite) loss
    assert torch.isfinite(distill_loss(student, (few.values, few.indices), kind, 0.4, 2.0)).all()


def test_fresh_student_learns_from_a_live_teacher_and_from_its_cache(tiny_base: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    base, data = tiny_base
    live = distill(FinetuneConfig(**settings(base, data, tmp_path / "live", kd_ratio=1.0)), progress=False)
    log = read_log(tmp_path / "live" / "log.csv")
    assert float(log[-1]["loss"]) < float(log[0]["loss"])
    assert (tmp_path / "live" / "hf" / "config.json").is_file()  # the student as a Hugging Face folder
    cache = tmp_path / "topk.safetensors"
    sets = [x for k, v in settings(base, data, tmp_path / "c", teacher_topk=600, teacher_cache=str(cache)).items()
            if not isinstance(v, dict) for x in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(app, ["teacher-cache", *sets, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "bytes per token" in result.output
    cached = distill(FinetuneConfig(**settings(base, data, tmp_path / "c", kd_ratio=1.0, teacher_topk=600,
                                               teacher_cache=str(cache))), progress=False)
    a, b = (read_log(tmp_path / o / "log.csv") for o in ("live", "c"))
    # every token kept (k = vocabulary): the same losses as the live teacher, up to fp16 logits
    for x, y in zip(a, b, strict=True):
        assert abs(float(x["loss"]) - float(y["loss"])) < 2e-3 * max(1.0, abs(float(x["loss"])))
    assert abs(live.val_loss - cached.val_loss) < 1e-2


def test_another_vocabulary_and_a_stale_cache_are_one_line_errors(tiny_base: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    base, data = tiny_base
    cfg = FinetuneConfig(**settings(base, data, tmp_path / "v"))
    cfg.student = {**STUDENT, "vocab_size": 700}
    with pytest.raises(CamelidError, match="same vocabulary") as e:
        KD(cfg, torch.device("cpu")).build_model()
    assert "\n" not in str(e.value)
    cache = tmp_path / "topk.safetensors"
    from camelid.finetune.distill import write_teacher_cache

    write_teacher_cache(FinetuneConfig(**settings(base, data, tmp_path / "w", teacher_cache=str(cache),
                                                  teacher_topk=4)), progress=False)
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(data.read_text().splitlines(keepends=True)[:50]))
    cfg = FinetuneConfig(**settings(base, fewer, tmp_path / "s", teacher_cache=str(cache), teacher_topk=4))
    with pytest.raises(CamelidError, match="stale teacher cache") as e:
        KD(cfg, torch.device("cpu")).build_model()
    assert "\n" not in str(e.value)


def test_sampled_teacher_averages_to_full_forward_kl_in_value_and_gradient() -> None:
    """Many independent draws of a sampled cache: their mean loss and gradient equal full forward KL's, while
    top-k with the same number of stored tokens is off by far more than the tolerance."""
    g = torch.Generator().manual_seed(3)
    n, vocab, draws, repeats, temperature = 4, 40, 16, 4000, 1.5
    student = 2 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    teacher = 2 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    ids, counts, logprobs, lengths = sample_teacher(teacher.repeat(repeats, 1), draws, temperature, g)
    assert int(counts.sum()) == n * repeats * draws and bool((lengths <= draws).all())
    starts = torch.cumsum(lengths, 0) - lengths
    sampled = gather_sampled({"ids": ids, "counts": counts.to(torch.uint8), "logprobs": logprobs.double(),
                              "starts": starts, "lengths": lengths.to(torch.uint8)}, torch.arange(n * repeats))
    a = student.repeat(repeats, 1).requires_grad_(True)
    estimate = distill_loss(a, SampledTeacher(sampled.ids, sampled.weights.double(), sampled.logprobs),
                            temperature=temperature).view(repeats, n)
    estimate.sum().backward()
    b = student.clone().requires_grad_(True)
    full = distill_loss(b, teacher, temperature=temperature)
    full.sum().backward()
    mean, stderr = estimate.mean(0), estimate.std(0) / repeats ** 0.5
    assert bool((stderr < 0.02).all())
    # 3 standard errors or more; top-k below is 0.2 or more away
    torch.testing.assert_close(mean.double(), full.detach().double(), rtol=0, atol=0.06)
    grad = a.grad.view(repeats, n, vocab).sum(0) / repeats  # type: ignore[union-attr]
    torch.testing.assert_close(grad.double(), b.grad.double(), rtol=0, atol=0.01)  # type: ignore[union-attr]
    top = teacher.topk(draws, -1)  # the biased alternative, as many stored tokens as draws
    assert (distill_loss(student, (top.values, top.indices), temperature=temperature) - full.detach()).abs().max() > 0.2


def test_sampled_cache_trains_and_bad_caches_are_one_line_errors(tiny_base: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from camelid.finetune.distill import write_teacher_cache

    base, data = tiny_base
    cache = tmp_path / "sampled.safetensors"
    opts = {"teacher_cache": str(cache), "teacher_cache_kind": "sampled", "teacher_samples": 12, "kd_ratio": 1.0}
    stats = write_teacher_cache(FinetuneConfig(**settings(base, data, tmp_path / "w", **opts)), progress=False)
    assert 0 < stats["bytes_per_token"] < 12 * 7 + 1 + 1
    distill(FinetuneConfig(**settings(base, data, tmp_path / "s", **opts)), progress=False)
    log = read_log(tmp_path / "s" / "log.csv")
    assert float(log[-1]["loss"]) < float(log[0]["loss"])

    def error(**extra: object) -> str:
        with pytest.raises(CamelidError) as e:
            KD(FinetuneConfig(**settings(base, data, tmp_path / "e", **{**opts, **extra})),
               torch.device("cpu")).build_model()
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "stale teacher cache" in error(teacher_samples=13)
    assert "teacher_cache_kind=sampled" in error(teacher_cache_kind="topk")
    with pytest.raises(CamelidError, match="forward KL only"):
        FinetuneConfig(**settings(base, data, tmp_path / "e", **{**opts, "kd_loss": "jsd"})).validate()
    tensors = load_file(str(cache))
    from safetensors import safe_open

    with safe_open(str(cache), "pt") as f:
        meta = f.metadata()
    tensors["counts"][0] += 1  # the draws at the first position no longer add up
    save_file(tensors, str(cache), metadata=meta)
    assert "damaged sampled teacher cache" in error()
