"""The whole-model C++ decode step (camelid/ops/csrc/decode_step.cpp) against the PyTorch path of the same model,
and its refusal of what it does not implement."""

from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch
from helpers import needs_kernels

from camelid.config import LlamaConfig
from camelid.generate import generate
from camelid.model import KVCache, Llama
from camelid.ops import native
from camelid.variants.decode_step import decode_step, refusal
from camelid.variants.fused import fuse
from camelid.variants.quantized import Int4Linear, Int8Linear, quantize_model

PROMPT = [1, 5, 9, 42, 7, 100, 3]


def _model(name: str, mode: str, tied: bool, **overrides: int) -> Llama:
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name(name, tie_embeddings=tied, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)  # peaked logits: greedy choices are not near-ties
    if mode == "fused":
        return fuse(model)  # plain nn.Linear weights, fused: the step reads them too
    return quantize_model(model, mode)


def _plain_generate(model: Llama, prompt: list[int], n: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    with monkeypatch.context() as m:
        m.setattr(sys.modules["camelid.generate"], "decode_step", lambda _model: None)
        return generate(model, prompt, n)


CASES = [("tiny-mha", False), ("tiny-gqa", False), ("tiny-gqa", True), ("tiny-mqa", True), ("tiny-llama3", True)]


@needs_kernels
@pytest.mark.parametrize("mode", ["fused", "fp32", "fp16", "int8", "int4"])
@pytest.mark.parametrize("name,tied", CASES)
def test_step_logits_and_greedy_tokens_match_the_torch_path(name: str, tied: bool, mode: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # intermediate 192 (a multiple of 32) keeps the int4 down projection int4; the presets' 176 makes it int8
    model = _model(name, mode, tied, intermediate_size=192 if name == "tiny-gqa" else 176)
    twin = copy.deepcopy(model)
    step = decode_step(model, int8_activations=False)
    assert step is not None
    with torch.inference_mode():
        for m in (model, twin):
            m.setup_cache(1, 40)
            m(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))
        _steps_agree(step, twin)
        for a, b in zip(model.layers, twin.layers, strict=True):  # the caches hold the same keys and values
            torch.testing.assert_close(a.attention.kv_cache.k, b.attention.kv_cache.k, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.attention.kv_cache.v, b.attention.kv_cache.v, rtol=1e-4, atol=1e-5)
    monkeypatch.setenv("CAMELID_INT8_ACTIVATIONS", "0")  # generate's step: exact, like the one above
    assert generate(model, PROMPT, 20) == _plain_generate(model, PROMPT, 20, monkeypatch)


def _steps_agree(step, twin: torch.nn.Module, n: int = 12) -> None:
    """12 greedy steps after PROMPT: the C++ step's logits equal the PyTorch twin's."""
    tok = 11
    for pos in range(len(PROMPT), len(PROMPT) + n):
        want = twin(torch.tensor([[tok]]), torch.tensor([pos]), last_only=True)
        torch.testing.assert_close(step(tok, pos), want, rtol=1e-4, atol=1e-4)
        tok = int(want.argmax())


def _q8(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 in blocks of 32 with one scale each (the step's int8 activations)."""
    g = x.reshape(*x.shape[:-1], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    # x * (127 / amax), as the kernel computes it: a differently rounded x / (amax / 127) can land on the other
    # side of a .5 and flip a code, which these peaked tiny models amplify to percents of a logit
    return (torch.round(g * (127 / amax)) * (amax / 127)).reshape(x.shape)


@needs_kernels
@pytest.mark.parametrize("mode,interleave", [("int8", False), ("int4", False), ("int8", True), ("int4", True)])
@pytest.mark.parametrize("name", ["tiny-gqa", "tiny-llama3"])  # tiny-llama3: 331 rows, the kernels' tail loop
def test_int8_activation_step_equals_torch_with_rounded_inputs(name: str, mode: str, interleave: bool) -> None:
    """With int8 activations the step is the PyTorch model whose quantised linears see int8-rounded inputs
    (so the only difference from the exact path is that rounding, which benchmarks/quality.py prices); the
    same with the int4 weights interleaved for batches (where the kernels have AVX-512 VNNI)."""
    model = _model(name, mode, True, intermediate_size=192)
    twin = copy.deepcopy(model)
    step = decode_step(model, int8_activations=True, interleave=interleave)
    assert (step.interleaved_bytes > 0) == (interleave and native.module().isa().endswith("avx512-q8"))
    with torch.inference_mode():
        for m in (model, twin):
            m.setup_cache(1, 40)
            m(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))
        for mod in twin.modules():
            if isinstance(mod, (Int8Linear, Int4Linear)):
                mod.register_forward_pre_hook(lambda _mod, args: (_q8(args[0]),))
        _steps_agree(step, twin)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 3, 5])  # more threads than heads' fair share, fewer rows than threads
def test_step_is_right_at_any_thread_count(threads: int) -> None:
    model = _model("tiny-gqa", "int4", False, intermediate_size=192)
    twin = copy.deepcopy(model)
    step = decode_step(model, int8_activations=False)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for m in (model, twin):
                m.setup_cache(1, 16)
                m(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))
            for pos in range(len(PROMPT), 16):
                want = twin(torch.tensor([[pos]]), torch.tensor([pos]), last_only=True)
                torch.testing.assert_close(step(pos, pos), want, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)


@needs_kernels
@pytest.mark.parametrize("mode", ["fp32", "int4"])
def test_torch_prompt_cpp_steps_torch_chunk_interleave(mode: str) -> None:
    """Prefill through torch, 5 C++ steps, a 3-token torch step, 5 more C++ steps: the same greedy tokens and
    logits as the torch path alone (both write the same KV cache)."""
    model = _model("tiny-gqa", mode, False)
    twin = copy.deepcopy(model)
    step = decode_step(model, int8_activations=False)
    chunk = [17, 23, 5]

    def run(m: Llama, fast: bool) -> tuple[list[int], list[torch.Tensor]]:
        toks, logits = [], []
        m.setup_cache(1, 40)
        last = m(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), last_only=True)
        pos = len(PROMPT)
        for phase in range(2):
            for _ in range(5):
                tok = int(last.argmax())
                toks.append(tok)
                last = step(tok, pos) if fast else m(torch.tensor([[tok]]), torch.tensor([pos]), last_only=True)
                logits.append(last)
                pos += 1
            if phase == 0:
                last = m(torch.tensor([chunk]), torch.arange(pos, pos + 3), last_only=True)
                pos += 3
        m.clear_cache()
        return toks, logits

    with torch.inference_mode():
        got_toks, got = run(model, True)
        want_toks, want = run(twin, False)
    assert got_toks == want_toks
    torch.testing.assert_close(torch.cat(got), torch.cat(want), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_step_rebinds_to_a_new_cache() -> None:
    model = _model("tiny-gqa", "int8", False)
    step = decode_step(model, int8_activations=False)
    with torch.inference_mode():
        for length in (16, 24):  # setup_cache makes new tensors: the step must follow them
            model.setup_cache(1, length)
            model(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))
            want = copy.deepcopy(model)(torch.tensor([[3]]), torch.tensor([len(PROMPT)]), last_only=True)
            torch.testing.assert_close(step(3, len(PROMPT)), want, rtol=1e-4, atol=1e-4)


def test_plain_and_unsupported_models_keep_the_torch_path() -> None:
    plain = Llama(LlamaConfig.from_name("tiny-gqa")).eval()
    assert decode_step(plain) is None  # not fused: the readable reference path
    assert "not fused" in refusal(plain)
    biased = fuse(Llama(LlamaConfig.from_name("tiny-gqa", qkv_bias=True)).eval())
    assert decode_step(biased) is None  # a bias in the QKV product: the kernel has none
    assert refusal(biased) == "the config sets qkv_bias=True, which the C++ decode step does not implement"
    half = copy.deepcopy(fuse(Llama(LlamaConfig.from_name("tiny-gqa")))).to(torch.bfloat16)
    assert decode_step(half) is None and "fp32" in refusal(half)


@dataclasses.dataclass
class FutureConfig(LlamaConfig):
    """A config with a field the step does not know (as a future LlamaConfig field would be)."""

    attention_sinks: int | None = None


class Adapter(torch.nn.Module):
    """A module the step does not know, wrapping a linear layer (as a LoRA adapter would)."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * 1.5


@pytest.mark.parametrize("change", ["config", "module", "subclass", "hook"])
def test_what_the_step_does_not_implement_is_refused_in_one_line_and_decoded_per_layer(
        change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("tiny-gqa", "int8", False)
    assert refusal(model) is None
    want_plain = _plain_generate(model, PROMPT, 12, monkeypatch)
    if change == "config":
        model.config = FutureConfig(**dataclasses.asdict(model.config), attention_sinks=4)
        expected = "the config sets attention_sinks=4, which the C++ decode step does not implement"
    elif change == "module":
        model.layers[1].feed_forward.w2 = Adapter(model.layers[1].feed_forward.w2)
        expected = "layers.1.feed_forward.w2 is of type Adapter, which the C++ decode step does not implement"
    elif change == "subclass":
        model.layers[0].attention.wo = type("MyInt8Linear", (Int8Linear,), {})(torch.randn(64, 64))
        expected = "layers.0.attention.wo is of type MyInt8Linear, which the C++ decode step does not implement"
    else:
        model.layers[0].ffn_norm.register_forward_hook(lambda _m, _a, out: out * 2)
        expected = "layers.0.ffn_norm has a forward hook, which the C++ decode step would skip"
    assert refusal(model) == expected and "\n" not in expected
    assert decode_step(model) is None
    # generate_tokens decodes through the per-layer path, so the change is honoured: the tokens are those of
    # the per-layer path (and, except for the unused config field, no longer the unchanged model's)
    assert generate(model, PROMPT, 12) == _plain_generate(model, PROMPT, 12, monkeypatch)
    if change != "config":
        assert generate(model, PROMPT, 12) != want_plain


@needs_kernels
def test_the_cli_says_why_it_decodes_per_layer_unless_quiet(tmp_path, small_tokenizer) -> None:
    """`camelid generate` on a model the step does not implement (q/k/v biases, Qwen2-style) decodes through the
    per-layer path and says why on stderr, in one line; with -q it says nothing."""
    import os
    import shutil
    import subprocess

    from camelid.interop.hf import save_hf_dir

    model = Llama(LlamaConfig.from_name("tiny-gqa", vocab_size=512, qkv_bias=True)).eval()
    save_hf_dir(model, tmp_path / "biased")
    shutil.copy(small_tokenizer, tmp_path / "biased" / "tokenizer.json")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "camelid", "generate", "Emma", "-m", str(tmp_path / "biased"),
                               "-n", "4", *args], capture_output=True, text=True, timeout=300, env=dict(os.environ))

    said = run()
    assert said.returncode == 0, said.stderr
    assert ("camelid: the config sets qkv_bias=True, which the C++ decode step does not implement; decoding "
            "through the per-layer path\n") in said.stderr
    quiet = run("-q")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == said.stdout


def _rows_model(mode: str, prompts: list[list[int]] | None = None) -> Llama:
    """A model with one cache row per prompt (ROW_PROMPTS: 4 rows), each holding its prompt (prompts of different
    lengths, prefilled one row at a time)."""
    return _prefilled(_model("tiny-gqa", mode, False, intermediate_size=192), prompts or ROW_PROMPTS, 40)


def _prefilled(model: Llama, prompts: list[list[int]], positions: int, kv_dtype: torch.dtype | None = None) -> Llama:
    """`model` with a cache of one row per prompt (of kv_dtype; None: the model's), row r holding prompt r
    (prefilled one row at a time)."""
    model.setup_cache(len(prompts), positions, kv_dtype)
    full = [b.attention.kv_cache for b in model.layers]
    with torch.inference_mode():
        for r, prompt in enumerate(prompts):
            for block, cache in zip(model.layers, full, strict=True):  # a view of row r as a 1-row cache
                block.attention.kv_cache = KVCache(0, cache.k.shape[1], cache.k.shape[2], cache.k.shape[3],
                                                   cache.k.dtype)
                block.attention.kv_cache.k, block.attention.kv_cache.v = cache.k[r:r + 1], cache.v[r:r + 1]
            model(torch.tensor([prompt]), torch.arange(len(prompt)))
    for block, cache in zip(model.layers, full, strict=True):
        block.attention.kv_cache = cache
    return model


ROW_PROMPTS = [[1, 5, 9, 42], [7, 3], [11, 12, 13, 14, 15, 16], [2]]


@needs_kernels
@pytest.mark.parametrize("mode", ["fused", "fp16", "int8", "int4"])
def test_rows_step_equals_the_per_layer_path_with_per_row_positions(mode: str) -> None:
    """One token for each of 4 sequences at different positions, each in its own cache row: the C++ step's
    logits and cache writes equal the PyTorch forward with positions [B, 1]."""
    model = _rows_model(mode)
    twin = copy.deepcopy(model)
    step = decode_step(model, int8_activations=False)
    tokens, positions = [3, 4, 5, 6], [len(p) for p in ROW_PROMPTS]
    with torch.inference_mode():
        for _ in range(3):
            got = step.rows(tokens, positions, [0, 1, 2, 3])
            want = twin(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], last_only=True)[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            tokens, positions = [int(t) for t in want.argmax(-1)], [p + 1 for p in positions]
    for a, b in zip(model.layers, twin.layers, strict=True):
        torch.testing.assert_close(a.attention.kv_cache.k, b.attention.kv_cache.k, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.attention.kv_cache.v, b.attention.kv_cache.v, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("mode,rows,interleave", [("fp32", 4, False), ("fp16", 4, False), ("int8", 4, False),
                                                  ("int4", 4, False),
                                                  ("int8", 11, False), ("int4", 11, False), ("int8", 11, True),
                                                  ("int4", 11, True)])
def test_a_rows_logits_do_not_depend_on_the_batch(mode: str, rows: int, interleave: bool) -> None:
    """Bit for bit: a sequence's logits are the same alone (and through the batch-1 call) or among others, in any
    order, so continuous batching never changes a greedy reply. (11 rows: the int8-activation kernels take 8
    activations at a time, then the rest.)"""
    prompts = [*ROW_PROMPTS, *([5 + r, 9, 2 * r + 1][: 1 + r % 3] for r in range(rows - len(ROW_PROMPTS)))]
    model = _rows_model(mode, prompts)
    alone, batched = copy.deepcopy(model), copy.deepcopy(model)
    one, many = decode_step(alone, interleave=interleave), decode_step(batched, interleave=interleave)
    tokens, positions = [3 + r for r in range(rows)], [len(p) for p in prompts]
    with torch.inference_mode():
        for i in range(3):
            singles = [one.rows([tokens[r] + i], [positions[r] + i], [r])[0] for r in range(rows)]
            order = list(range(rows))[::-1]
            together = many.rows([tokens[r] + i for r in order], [positions[r] + i for r in order], order)
            for r in range(rows):
                assert torch.equal(singles[r], together[rows - 1 - r])
        assert torch.equal(one(9, 20)[0, 0], many.rows([9], [20], [0])[0])
    with pytest.raises(RuntimeError, match="two tokens in one cache row"):
        many.rows([1, 2], [30, 30], [1, 1])


@needs_kernels
@pytest.mark.parametrize("heads,kv_heads,head_dim,kv_dtype", [
    (9, 3, 64, torch.float32), (4, 2, 128, torch.float32), (6, 2, 48, torch.float32),
    (9, 3, 64, torch.float16), (4, 2, 128, torch.float16), (6, 2, 48, torch.float16)])
def test_grouped_attention_over_long_caches_matches_fp64_and_not_the_batch(heads: int, kv_heads: int,
                                                                            head_dim: int,
                                                                            kv_dtype: torch.dtype) -> None:
    """SmolLM2's attention shape (9 query heads over 3 KV heads, head_dim 64) and others, at positions that take
    the vectorised paths' blocks of 16 cached positions and their remainders, in one, two and three chunks of 128
    positions (merged after the threads have run them): the C++ rows step against the fp64 PyTorch forward, and
    each row bit for bit the same alone (at 2 threads: one task per head) as in a batch (one task per group of
    heads), and at 1, 2 or 3 threads. With an fp16 cache (the serving engine's --kv-dtype fp16) both sides store
    keys and values rounded to fp16 and compute in fp32 / fp64."""
    torch.manual_seed(0)
    config = LlamaConfig.from_name("tiny-gqa", dim=heads * head_dim, n_heads=heads, n_kv_heads=kv_heads,
                                   intermediate_size=64, max_seq_len=320)
    base = Llama(config).eval()
    prompts = [[(7 * r + 3 * i) % 300 + 1 for i in range(n)] for r, n in enumerate([16, 47, 160, 295])]
    model = _prefilled(quantize_model(copy.deepcopy(base), "fp32"), prompts, 320, kv_dtype)
    alone = copy.deepcopy(model)
    reference = _prefilled(copy.deepcopy(base).double(), prompts, 320,
                           torch.float16 if kv_dtype == torch.float16 else None)
    step, one = decode_step(model), decode_step(alone)
    assert step is not None and one is not None
    tokens, positions, rows = [3, 4, 5, 6], [len(p) for p in prompts], [0, 1, 2, 3]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            for _ in range(2):
                got = step.rows(tokens, positions, rows)
                want = reference(torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], last_only=True)
                torch.testing.assert_close(got, want[:, -1], rtol=1e-4, atol=1e-4)  # fp64 inside, fp32 out
                for r in rows:
                    assert torch.equal(one.rows([tokens[r]], [positions[r]], [r])[0], got[r])
                for n in (1, 3):
                    torch.set_num_threads(n)
                    assert torch.equal(one.rows([tokens[3]], [positions[3]], [3])[0], got[3])
                torch.set_num_threads(2)
                tokens, positions = [int(t) for t in want[:, -1].argmax(-1)], [p + 1 for p in positions]
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(model.layers, reference.layers, strict=True):  # the step's cache writes: within an fp16 ulp
        ours, theirs = a.attention.kv_cache, b.attention.kv_cache
        for x, y in ((ours.k, theirs.k), (ours.v, theirs.v)):
            assert x.dtype == kv_dtype
            torch.testing.assert_close(x.float(), y.float(), rtol=2e-3, atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("mode,kv_dtype", [("fp32", None), ("int4", None), ("int4", torch.float16)])
def test_a_shared_prefix_is_read_from_its_source_row(mode: str, kv_dtype: torch.dtype | None) -> None:
    """Rows that hold the same prefix (from the prefix cache) read it from one row: with row 1's copy of the
    prefix overwritten by NaN, pointing it at row 0's gives bit for bit the logits of the intact rows."""
    common = list(range(20, 52))  # 32 positions
    prompts = [common + [3], common + [4, 5], common + [6]]
    model = _prefilled(_model("tiny-gqa", mode, False, intermediate_size=192), prompts, 48, kv_dtype)
    intact = copy.deepcopy(model)
    tokens, positions, rows = [7, 8, 9], [len(p) for p in prompts], [0, 1, 2]
    with torch.inference_mode():
        want = decode_step(intact).rows(tokens, positions, rows)
        for block in model.layers:
            block.attention.kv_cache.k[1:, :, :32] = float("nan")
            block.attention.kv_cache.v[1:, :, :32] = float("nan")
        step = decode_step(model)
        got = step.rows(tokens, positions, rows, [0, 0, 0], [0, 32, 16])
        assert not torch.equal(got[2], want[2])  # row 2 shares 16 positions: it reads its own NaN at 16..31
        assert torch.equal(got[:2], want[:2])
        assert torch.equal(step.rows(tokens, positions, rows, [0, 0, 0], [0, 32, 32]), want)
        with pytest.raises(RuntimeError, match="multiple of 16"):
            step.rows(tokens, positions, rows, [0, 0, 0], [0, 8, 0])
        with pytest.raises(RuntimeError, match="one source row and one shared length"):
            step.rows(tokens, positions, rows, [0], [0])


def test_the_greedy_heads_bounds_hold_for_any_hidden_state() -> None:
    """|h . w - h . (q * scale)| <= ||h|| err for every row, in float64, on rows of very different scales, a
    zero row and rows one ulp apart; wq is the norm of the int8 row."""
    from camelid.variants.decode_step import greedy_head

    torch.manual_seed(0)
    w = torch.randn(300, 96) * torch.logspace(-4, 2, 300)[:, None]
    w[7] = 0
    w[8] = w[9].nextafter(torch.full_like(w[9], float("inf")))
    q, scale, err, wq = greedy_head(w, rows_at_once=64)
    assert greedy_head(w) is not None and q.dtype == torch.int8 and q.abs().max() <= 127
    approx = q.double() * scale.double()[:, None]
    torch.testing.assert_close(wq.double(), approx.norm(dim=1), rtol=2e-3, atol=0)
    h = torch.randn(500, 96, dtype=torch.float64) * torch.logspace(-3, 3, 500, dtype=torch.float64)[:, None]
    gap = (h @ w.double().T - h @ approx.T).abs()
    assert (gap <= h.norm(dim=1, keepdim=True) * err.double()).all()
    assert (err >= 0).all() and (err.double() <= 0.05 * w.double().norm(dim=1)).all()  # not vacuous


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name,tied", [("tiny-gqa", False), ("tiny-llama3", True)])
def test_the_greedy_step_is_the_argmax_of_the_full_step(name: str, tied: bool, threads: int) -> None:
    """forward_argmax = the argmax of forward's logits, first index on ties: on peaked and on flat logits (a
    head of tiny weights: every row a candidate), and with duplicated rows (exact ties)."""
    torch.set_num_threads(threads)
    try:
        for spread in (0.15, 1e-4):
            model = _model(name, "fp32", tied)
            with torch.no_grad():
                w = model.output.weight
                w.mul_(spread / 0.15)
                w[40:48] = w[16:24]  # exact ties between rows 16.. and 40.. (inside blocks of 8 rows)
            step = decode_step(model, greedy=True)
            assert step is not None and step.greedy
            with torch.inference_mode():
                model.setup_cache(1, 64)
                h = model.hidden_states(torch.tensor([PROMPT]), torch.arange(len(PROMPT)))[0, -1]
                want = model.output(h).argmax()
                assert step.head_argmax(h) == int(want)
                tok = 11
                for pos in range(len(PROMPT), len(PROMPT) + 24):
                    full = int(step(tok, pos)[0, -1].argmax())
                    assert step.argmax(tok, pos) == full
                    tok = full if pos % 3 else 16  # row 16 has a twin: its logit ties with row 40's
    finally:
        torch.set_num_threads(2)


@needs_kernels
@pytest.mark.parametrize("name,tied", CASES)
def test_greedy_generation_with_the_greedy_head_equals_the_torch_path(name: str, tied: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(name, "fp32", tied)
    want = _plain_generate(model, PROMPT, 24, monkeypatch)
    step = decode_step(model)  # on by default for an fp32 head
    assert step is not None and step.greedy
    assert generate(model, PROMPT, 24) == want
    monkeypatch.setenv("CAMELID_GREEDY_HEAD", "0")
    assert not decode_step(model).greedy
    assert generate(model, PROMPT, 24) == want
