from __future__ import annotations

import math

import pytest

from camelid.errors import CamelidError
from camelid.train.config import TrainConfig, load_config
from camelid.train.loop import lr_factor, steps_that_fit


def test_yaml_and_toml_configs_with_overrides(tmp_path) -> None:
    (tmp_path / "a.yaml").write_text("lr: 3e-4\nmax_steps: 50\nmodel:\n  preset: tiny-gqa\n  dim: 128\n")
    (tmp_path / "a.toml").write_text('lr = 3e-4\nmax_steps = 50\n[model]\npreset = "tiny-gqa"\ndim = 128\n')
    a, b = load_config(tmp_path / "a.yaml"), load_config(tmp_path / "a.toml")
    assert a == b and a.lr == 3e-4 and isinstance(a.lr, float)
    c = load_config(tmp_path / "a.yaml", ["lr=1e-3", "model.n_layers=3", "compile=true", "out=runs/x"])
    assert (c.lr, c.compile, c.out) == (1e-3, True, "runs/x")
    m = c.llama_config(vocab_size=1000)
    assert (m.dim, m.n_layers, m.n_kv_heads, m.vocab_size, m.max_seq_len) == (128, 3, 2, 1000, c.block_size)
    assert TrainConfig(model="tiny-mha").llama_config().vocab_size == 320  # a preset's own vocab wins


@pytest.mark.parametrize(("overrides", "message"), [
    (["lr"], "not key=value"),
    (["lrr=1"], "unknown setting"),
    (["max_steps=ten"], "must be an integer"),
    (["compile=maybe"], "true or false"),
    (["distributed=horovod"], "'ddp' or 'fsdp'"),
    (["min_lr=1", "lr=0.1"], "above lr"),
    (["lr_schedule=step"], "cosine, linear, constant"),
    (["time_budget_s=-1"], "time_budget_s must be"),
])
def test_bad_settings_are_one_line_errors(overrides, message) -> None:
    with pytest.raises(CamelidError, match=message):
        load_config(None, overrides)


def test_bad_files_and_model_fields(tmp_path) -> None:
    with pytest.raises(CamelidError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("lr: [1,\n")
    with pytest.raises(CamelidError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(CamelidError, match="unknown field"):
        load_config(None, ["model.depth=3"]).llama_config()


def test_lr_schedule_matches_transformers() -> None:
    import torch
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ref = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=100, min_lr=1e-4)
    for step in range(100):
        ours = 1e-3 * lr_factor(step, 10, 100, 0.1)
        assert math.isclose(ours, ref.get_last_lr()[0], rel_tol=1e-12, abs_tol=1e-15), step
        opt.step()
        ref.step()


def test_linear_and_constant_schedules_match_transformers() -> None:
    import torch
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    linear = get_linear_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=100)
    constant = get_constant_schedule_with_warmup(opt, num_warmup_steps=10)
    for step in range(100):
        assert math.isclose(lr_factor(step, 10, 100, 0.0, "linear"), linear.lr_lambdas[0](step), abs_tol=1e-12)
        assert math.isclose(lr_factor(step, 10, 100, 0.0, "constant"), constant.lr_lambdas[0](step), abs_tol=1e-12)
    assert lr_factor(100, 0, 100, 0.25, "linear") == 0.25  # linear ends at min_lr too


def test_a_time_budget_fits_the_steps_to_the_pace() -> None:
    # 10 s spent on 10 steps, 100 s budget: 90 more steps fit
    assert steps_that_fit(100.0, 10.0, 10, 1.0, 1000) == 100
    assert steps_that_fit(100.0, 10.0, 10, 1.0, 50) == 50  # never past max_steps
    assert steps_that_fit(100.0, 120.0, 10, 1.0, 1000) == 10  # over budget: this step is the last
