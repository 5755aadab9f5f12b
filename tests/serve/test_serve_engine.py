"""The continuous-batching engine against plain generation: the same greedy tokens for every sequence whatever
else shares its steps (admitted mid-way, queued, retired), with the prefix cache, and its limits."""

from __future__ import annotations

import copy
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import needs_kernels, peaked_model

from camelid.errors import CamelidError
from camelid.generate import SamplingParams, generate
from camelid.model import Llama
from camelid.serve.engine import Done, Engine, PromptLogprobs, QueueFull, Sequence, Token
from camelid.variants.quantized import quantize_model


class Collect:
    """A sequence's events, and an Event set when it is done."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.events: list[object] = []
        self.done = threading.Event()
        self.reason = ""

    def __call__(self, event: object) -> None:
        self.events.append(event)
        if isinstance(event, Token):
            self.tokens.append(event.id)
        elif isinstance(event, Done):
            self.reason = event.reason
            self.done.set()


def submit(engine: Engine, prompt: list[int], n: int, **kw: object) -> tuple[Sequence, Collect]:
    out = Collect()
    seq = Sequence(prompt=prompt, max_tokens=n, emit=out, **kw)
    engine.submit([seq])
    return seq, out


def model_for(mode: str) -> Llama:
    torch.manual_seed(0)
    model = peaked_model("tiny-gqa", intermediate_size=192, max_seq_len=128)
    return model if mode == "reference" else quantize_model(model, mode)


def reference_tokens(model: Llama, prompt: list[int], n: int, fast: bool, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(sys.modules["camelid.generate"], "decode_step", lambda _model: None)
        return generate(copy.deepcopy(model), prompt, n)


PROMPTS = [[1, 5, 9, 42, 7], [3, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [2, 4, 6], [30, 31, 32, 33],
           [40] * 9]


@pytest.mark.parametrize("mode,fast,kv_dtype", [pytest.param("fp32", True, "fp32", marks=needs_kernels),
                                                pytest.param("int4", True, "fp32", marks=needs_kernels),
                                                ("fp32", False, "fp32"), ("reference", False, None),
                                                pytest.param("int4", True, "fp16", marks=needs_kernels),
                                                ("fp32", False, "fp16")])
def test_every_sequence_gets_its_own_greedy_tokens(mode: str, fast: bool, kv_dtype: str | None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """6 prompts, 3 slots: sequences join running batches, wait in the queue, retire at different steps (their
    rows move); each gets exactly the tokens it gets alone (with an fp16 KV cache too: the peaked model's greedy
    choices are far apart, so rounding the cached keys and values does not change them)."""
    model = model_for(mode)
    lengths = [12, 5, 9, 14, 3, 10]
    want = [reference_tokens(model, p, n, fast, monkeypatch) for p, n in zip(PROMPTS, lengths, strict=True)]
    engine = Engine(copy.deepcopy(model), slots=3, context=64, use_decode_step=fast, kv_dtype=kv_dtype).start()
    try:
        assert (engine.step is not None) == fast
        assert engine.kv.dtype == {"fp16": torch.float16}.get(kv_dtype or "", torch.float32)
        outs = []
        for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
            outs.append(submit(engine, p, n)[1])
            if i == 2:
                time.sleep(0.05)  # the rest arrive while the first three decode
        for out in outs:
            assert out.done.wait(60)
        assert [o.tokens for o in outs] == want
        assert all(o.reason == "length" for o in outs)
        assert engine.running == [] and engine.queue_depth() == 0
    finally:
        engine.stop()


@needs_kernels
def test_the_prefix_cache_skips_a_shared_prefix_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_for("fp32")
    system = list(range(50, 90))  # 40 tokens: two whole blocks of 16 are reusable
    prompts = [system + [5, 6, 7], system + [9], system + [11, 12]]
    engine = Engine(copy.deepcopy(model), slots=2, context=64).start()
    try:
        seqs = []
        for p in prompts:
            seq, out = submit(engine, p, 6)
            assert out.done.wait(60)
            seqs.append((seq, out))
        assert [s.cached_tokens for s, _ in seqs] == [0, 32, 32]
        assert [o.tokens for _, o in seqs] == [reference_tokens(model, p, 6, True, monkeypatch) for p in prompts]
        assert engine.prefix_cache.hits == 2
    finally:
        engine.stop()


@needs_kernels
@pytest.mark.parametrize("mode", ["fp32", "int4"])
def test_sequences_sharing_a_cached_prefix_read_it_from_one_row(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that took the same blocks from the prefix cache run in one step reading those positions from
    the first one's row (the C++ step is told so), and each still gets its own greedy tokens."""
    model = model_for(mode)
    system = list(range(50, 90))  # two whole blocks of 16
    prompts = [system + [5, 6, 7], system + [9], system + [11, 12], system + [13]]
    want = [reference_tokens(model, p, 8, True, monkeypatch) for p in prompts]
    engine = Engine(copy.deepcopy(model), slots=4, context=64)
    shared: list[tuple[list[int], list[int]]] = []
    rows = engine.step.rows

    def spy(tokens: list[int], positions: list[int], rows_: list[int], sources: list[int] | None = None,
            lengths: list[int] | None = None) -> torch.Tensor:
        if lengths is not None:
            shared.append((sources, lengths))
        return rows(tokens, positions, rows_, sources, lengths)

    engine.step.rows = spy
    engine.start()
    try:
        outs = [submit(engine, prompts[0], 8)[1]]
        assert outs[0].done.wait(60)  # its prompt's blocks are now in the prefix cache
        outs += [submit(engine, p, 8)[1] for p in prompts[1:]]
        for out in outs:
            assert out.done.wait(60)
        assert [o.tokens for o in outs] == want
        # the three later requests: the first reads its own row, the other two the first's 32 positions
        assert ([0, 0, 0], [0, 32, 32]) in shared
    finally:
        engine.stop()


def test_prompt_logprobs_are_the_models_own() -> None:
    model = model_for("reference")
    prompt = [1, 5, 9, 42, 7, 3, 8, 100, 12]
    engine = Engine(copy.deepcopy(model), slots=2, context=32, prefill_chunk=4).start()  # 3 chunks
    try:
        _, out = submit(engine, prompt, 2, prompt_logprobs=True, logprobs=3)
        assert out.done.wait(60)
    finally:
        engine.stop()
    scores = next(e for e in out.events if isinstance(e, PromptLogprobs))
    with torch.no_grad():
        want = F.log_softmax(model(torch.tensor([prompt]))[0].float(), -1)
    assert scores.logprobs[0] is None and len(scores.logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        assert scores.logprobs[j] == pytest.approx(float(want[j - 1, prompt[j]]), abs=1e-4)
        top_ids = [i for i, _ in scores.top[j]]
        assert top_ids == want[j - 1].topk(3).indices.tolist()
    first = next(e for e in out.events if isinstance(e, Token))
    assert first.id == int(want[-1].argmax()) and first.logprob == pytest.approx(float(want[-1].max()), abs=1e-4)


def test_a_seed_gives_the_same_sample_alone_or_in_a_batch() -> None:
    model = model_for("reference")
    params = SamplingParams(temperature=1.0, top_p=0.9)
    runs = []
    for others in (0, 3):
        engine = Engine(copy.deepcopy(model), slots=4, context=64).start()
        try:
            for i in range(others):
                submit(engine, PROMPTS[i], 10, params=params, seed=100 + i)
            _, out = submit(engine, PROMPTS[4], 10, params=params, seed=7)
            assert out.done.wait(60)
            runs.append(out.tokens)
        finally:
            engine.stop()
    assert runs[0] == runs[1]


def test_cancel_frees_the_slot_and_the_queue_is_bounded() -> None:
    model = model_for("reference")
    engine = Engine(copy.deepcopy(model), slots=1, context=128, max_queue=2).start()
    try:
        long_seq, long_out = submit(engine, [1, 2, 3], 120)
        while not long_out.tokens:  # running: the one slot is taken
            time.sleep(0.01)
        waiting = [submit(engine, [4, 5], 3) for _ in range(2)]
        with pytest.raises(QueueFull):
            submit(engine, [6], 3)
        engine.cancel(long_seq)
        assert long_out.done.wait(30) and long_out.reason == "cancelled"
        assert len(long_out.tokens) < 120
        for _, out in waiting:
            assert out.done.wait(30) and out.reason == "length"
        _, timed = submit(engine, [7, 8], 120, timeout=0.0)
        assert timed.done.wait(30) and timed.reason == "length" and len(timed.tokens) < 120
        with pytest.raises(Exception, match="exceeds the context"):
            submit(engine, [1] * 100, 40)
    finally:
        engine.stop()


def test_a_prompt_prefilled_in_chunks_continues_as_the_model_does() -> None:
    """prefill_chunk=4: a 13-token prompt takes 4 iterations while another sequence decodes in between; every
    greedy token is the reference model's argmax given the same text (up to float rounding: chunks change
    the order of sums, so a near-tie may go either way)."""
    model = model_for("reference")
    engine = Engine(copy.deepcopy(model), slots=2, context=64, prefill_chunk=4).start()
    prompt = [7, 1, 9, 33, 2, 8, 15, 4, 19, 23, 6, 11, 5]
    try:
        _, other = submit(engine, [3, 4], 30)
        _, out = submit(engine, prompt, 12)
        assert out.done.wait(60) and other.done.wait(60)
    finally:
        engine.stop()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.tokens]))[0, len(prompt) - 1:-1]
    for step, token in enumerate(out.tokens):
        assert logits[step, token] >= logits[step].max() - 1e-3, step


def test_prefix_cache_blocks_and_eviction() -> None:
    from camelid.serve.prefix_cache import PrefixCache

    kv = torch.arange(64, dtype=torch.float32).view(1, 1, 1, 64, 1)  # position p holds the value p
    cache = PrefixCache(max_bytes=3 * 4 * 4, block=4)  # room for three blocks of 4 positions
    cache.store(list(range(10)), lambda a, b: kv[:, :, :, a:b])
    assert len(cache) == 2  # whole blocks only
    found = cache.lookup(list(range(9)) + [99])
    assert [b.flatten().tolist() for b in found] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(cache.lookup([0, 1, 2, 3, 9])) == 1 and cache.lookup([1, 2, 3, 4]) == []  # a prefix from position 0
    cache.store([0, 1, 2, 3, 40, 41, 42, 43], lambda a, b: kv[:, :, :, a:b] + 100)  # shares the first block
    assert len(cache) == 3
    cache.store([0, 1, 2, 3, 50, 51, 52, 53], lambda a, b: kv[:, :, :, a:b] + 200)  # evicts the oldest leaf
    assert len(cache) == 3 and cache.bytes <= cache.max_bytes
    assert len(cache.lookup([0, 1, 2, 3, 4, 5, 6, 7, 8])) == 1  # [4..7] was the least recently used
    assert len(cache.lookup([0, 1, 2, 3, 40, 41, 42, 43, 1])) == 2


def test_logit_bias_bans_and_forces_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """A -100 bias on each greedy token moves greedy decoding to another token; a +100 bias (an int, as JSON may
    give) on one token makes every token that one."""
    model = model_for("reference")
    prompt = PROMPTS[0]
    free = reference_tokens(model, prompt, 6, False, monkeypatch)
    engine = Engine(copy.deepcopy(model), slots=2, context=64).start()
    try:
        _, banned = submit(engine, prompt, 6, logit_bias={t: -100.0 for t in set(free)})
        _, forced = submit(engine, prompt, 6, logit_bias={17: 100})
        assert banned.done.wait(60) and forced.done.wait(60)
    finally:
        engine.stop()
    assert not set(banned.tokens) & set(free)
    assert forced.tokens == [17] * 6


@pytest.mark.parametrize("fast", [pytest.param(True, marks=needs_kernels), False])
def test_adapter_models_share_the_slots_and_keep_their_own_tokens(fast: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two models with one config (the base, and a perturbed copy standing for a merged LoRA adapter) in one
    engine: 6 sequences alternating between them over 3 slots, rows moving as they retire; each gets the tokens
    its own model gives it alone (C++ step per model, or the per-layer forward over every row)."""
    base = model_for("fp32")
    other = copy.deepcopy(base)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.abs().mean())
    lengths = [12, 5, 9, 14, 3, 10]
    names = [None, "other"] * 3
    want = [reference_tokens(base if a is None else other, p, n, fast, monkeypatch)
            for p, n, a in zip(PROMPTS, lengths, names, strict=True)]
    assert want[1] != reference_tokens(base, PROMPTS[1], lengths[1], fast, monkeypatch)  # the models differ
    engine = Engine(copy.deepcopy(base), slots=3, context=64, use_decode_step=fast,
                    adapters={"other": copy.deepcopy(other)}).start()
    try:
        outs = [submit(engine, p, n, adapter=a)[1] for p, n, a in zip(PROMPTS, lengths, names, strict=True)]
        for out in outs:
            assert out.done.wait(60)
        assert [o.tokens for o in outs] == want
        with pytest.raises(CamelidError, match="no adapter named"):
            submit(engine, PROMPTS[0], 2, adapter="missing")
    finally:
        engine.stop()


def test_an_unknown_kv_dtype_is_one_line() -> None:
    with pytest.raises(CamelidError, match="KV-cache dtype 'int3': choose one of fp32, fp16"):
        Engine(model_for("fp32"), slots=1, context=16, kv_dtype="int3")


@needs_kernels
def test_interleaved_weights_are_opt_in_and_only_for_batches() -> None:
    from camelid.ops import native

    model = model_for("int4")
    wide = native.module().isa().endswith("avx512-q8")  # the interleaved kernels' build
    assert Engine(copy.deepcopy(model), slots=2, context=32).step.interleaved_bytes == 0
    assert (Engine(copy.deepcopy(model), slots=2, context=32, interleave=True).step.interleaved_bytes > 0) == wide
    assert Engine(copy.deepcopy(model), slots=1, context=32, interleave=True).step.interleaved_bytes == 0


def test_a_steps_greedy_rows_take_one_argmax_and_the_rest_are_sampled_alone() -> None:
    """`Engine._greedy`: each plain-greedy row's token is the argmax of its logits plus its logit_bias (the ban
    moves it, the rows beside it do not); rows with log-probabilities, penalties or sampling get None."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 5)
    keep = logits.clone()
    rows = [Sequence([1], 4, print), Sequence([1], 4, print, logit_bias={1: -100.0}),
            Sequence([1], 4, print, logprobs=0), Sequence([1], 4, print, params=SamplingParams(temperature=1.0)),
            Sequence([1], 4, print, logit_bias={2: 5, 0: -1.0})]
    assert Engine._greedy(rows, logits) == [1, 3, None, None, 2]
    assert torch.equal(logits, keep)  # the step's logits are not changed in place
    assert Engine._greedy(rows[2:4], logits[2:4]) == [None, None]


def test_the_mailbox_hands_a_threads_events_to_the_loop_in_order_with_fewer_wake_ups() -> None:
    """Events posted from another thread (the engine's) reach their asyncio queues in order; events posted while
    a delivery is pending ride along with it (one wake-up of the loop here)."""
    import asyncio

    from camelid.serve.app import Mailbox

    async def main() -> tuple[list[int], list[int], int]:
        loop = asyncio.get_running_loop()
        box = Mailbox.of(loop)
        assert Mailbox.of(loop) is box
        a: asyncio.Queue[int] = asyncio.Queue()
        b: asyncio.Queue[int] = asyncio.Queue()
        wake_ups = 0
        deliver = box._deliver

        def counted() -> None:
            nonlocal wake_ups
            wake_ups += 1
            deliver()

        box._deliver = counted  # type: ignore[method-assign]

        def engine() -> None:
            for i in range(200):
                box.post(a if i % 2 else b, i)

        thread = threading.Thread(target=engine)
        thread.start()
        thread.join()  # the loop is held meanwhile: every post waits for one delivery
        got_a = [await asyncio.wait_for(a.get(), 5) for _ in range(100)]
        got_b = [await asyncio.wait_for(b.get(), 5) for _ in range(100)]
        return got_a, got_b, wake_ups

    got_a, got_b, wake_ups = asyncio.run(main())
    assert got_a == list(range(1, 200, 2)) and got_b == list(range(0, 200, 2))
    assert wake_ups == 1
