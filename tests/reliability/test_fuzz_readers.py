"""Property-based fuzzing of the readers of files from strangers: a GGUF file, a Hugging Face folder's
model.safetensors and its config.json, each a real small file (written by camelid's own writers) mutated by
hypothesis: cut short, bytes flipped, lengths and numbers made huge, zero or negative.

Every example must either load correctly (the model runs, its tokenizer round-trips: a flipped byte in tensor data
is a different model, not an error) or raise one CamelidError line, and do so within bounded memory and time: the
reading happens in a worker process (fuzz_worker.py) whose address space is capped at what it used after importing
camelid plus 1 GiB, so believing a huge length is a MemoryError there, a failure here; and an example that takes
longer than EXAMPLE_TIMEOUT_S (a hang guard, not a measurement) fails too."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reliability_helpers import ROOT

from camelid import Llama, LlamaConfig
from camelid.interop.gguf import save_gguf
from camelid.interop.hf import save_hf_dir

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker caps memory with RLIMIT_AS")

EXAMPLE_TIMEOUT_S = 120
HUGE = [2**63 - 1, 2**64 - 1, 2**32 - 1, 2**40, 10**12, 10**18, 0, -1, -(2**31)]


class Worker:
    """fuzz_worker.py, restarted after an example that killed it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fuzz_worker.py"))], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert "ready" in json.loads(self.proc.stdout.readline())

    def read(self, reader: str, path: Path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps({"reader": reader, "path": str(path)}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], EXAMPLE_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"outcome": "died" if ready else "timeout", "detail": path.name}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def originals(tmp_path_factory, cue_examples) -> dict[str, bytes]:
    """The real small files the mutations start from: a q8_0 GGUF with a vocabulary, and a Hugging Face folder."""
    from classify_helpers import bpe_tokenizer

    root = tmp_path_factory.mktemp("originals")
    (root / "tok").mkdir()
    tok = bpe_tokenizer([e.text for e in cue_examples[0]], root / "tok")
    model = Llama(LlamaConfig.from_name("tiny-gqa", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id)).eval()
    gguf = save_gguf(model, root / "tiny.gguf", tokenizer=tok, qtype="q8_0", progress=False)
    hf = save_hf_dir(model, root / "hf")
    return {"gguf": gguf.read_bytes(), "model.safetensors": (hf / "model.safetensors").read_bytes(),
            "config.json": (hf / "config.json").read_bytes()}


def mutate(data: bytes, kind: str, seed: int, n: int, hot: int) -> bytes:
    """`data` cut short, with n bytes flipped, with 8 bytes made a huge/zero/negative integer, or with a decimal
    number made one; `hot`: the first bytes, where the lengths and counts are, get most of the changes."""
    rng = random.Random(seed)
    out = bytearray(data)
    where = min(len(out), hot if rng.random() < 0.8 else len(out))
    if kind == "truncate":
        return bytes(out[: rng.randrange(len(out))])
    if kind == "flip":
        for _ in range(n):
            out[rng.randrange(where)] ^= 1 << rng.randrange(8)
    elif kind == "huge":
        at = rng.randrange(max(1, min(where, len(out) - 8)))
        out[at:at + 8] = (rng.choice(HUGE) % 2**64).to_bytes(8, "little")
    else:  # a number in the text (config.json, the safetensors header's JSON) made huge, zero or negative
        numbers = list(re.finditer(rb"-?\d+(\.\d+)?", bytes(out[:where])))
        if numbers:
            m = rng.choice(numbers)
            out[m.start():m.end()] = str(rng.choice([*HUGE, 10**400, 1e308, -0.5])).encode()
    return bytes(out)


MUTATIONS = st.tuples(st.sampled_from(["truncate", "flip", "huge", "number"]), st.integers(0, 2**32), st.integers(1, 8))
_names = itertools.count()


def check(worker: Worker, reader: str, path: Path) -> None:
    answer = worker.read(reader, path)
    event(answer["outcome"])  # --hypothesis-show-statistics: how many loaded, how many were refused
    assert answer["outcome"] in ("loaded", "error"), answer
    if answer["outcome"] == "error":
        assert "\n" not in answer["detail"] and answer["detail"], answer


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(MUTATIONS)
def test_a_damaged_gguf_loads_or_fails_in_one_line(worker, originals, tmp_path_factory, mutation) -> None:
    path = tmp_path_factory.mktemp("gguf") / f"damaged-{next(_names)}.gguf"
    path.write_bytes(mutate(originals["gguf"], *mutation, hot=8192))
    check(worker, "gguf", path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(MUTATIONS)
def test_a_damaged_safetensors_file_loads_or_fails_in_one_line(worker, originals, tmp_path_factory, mutation) -> None:
    folder = tmp_path_factory.mktemp("safetensors")
    data = originals["model.safetensors"]
    header = 8 + int.from_bytes(data[:8], "little")
    (folder / "model.safetensors").write_bytes(mutate(data, *mutation, hot=header))
    (folder / "config.json").write_bytes(originals["config.json"])
    check(worker, "hf", folder)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(MUTATIONS)
def test_a_damaged_config_json_loads_or_fails_in_one_line(worker, originals, tmp_path_factory, mutation) -> None:
    folder = tmp_path_factory.mktemp("config")
    (folder / "model.safetensors").write_bytes(originals["model.safetensors"])
    data = originals["config.json"]
    (folder / "config.json").write_bytes(mutate(data, *mutation, hot=len(data)))
    check(worker, "hf", folder)


def test_the_cap_holds_in_the_worker(worker) -> None:
    """Believing a huge length fails in the worker, as a MemoryError this test counts as a failure; and the worker
    goes on afterwards (the bytes were never taken)."""
    answer = worker.read("allocate", Path(str(8 << 30)))
    assert answer["outcome"] == "other" and answer["detail"].startswith("MemoryError"), answer
    assert worker.read("allocate", Path(str(1 << 20))) == {"outcome": "loaded", "detail": str(1 << 20)}
