"""LoRA adapters served per request: `camelid serve MODEL --adapter NAME=DIR` answers requests for model NAME
with the adapter, as `camelid.load(MODEL, adapter=DIR)` generates, and base requests stay the base model's,
also when both share decode steps and a prompt prefix."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from serve_helpers import Server, request

PROMPTS = ["It was a fine morning, and Emma", "Mr. Knightley said that", "Harriet walked to the"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 adapter on every linear of the tiny model, with random weights large enough to change its text."""
    import camelid
    from camelid.variants.lora import apply_lora, lora_modules, save_adapter

    model = camelid.load(tiny_model, tokenizer=False).model
    apply_lora(model, 4, alpha=8.0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * 0.3)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "styled")


@pytest.fixture(scope="module")
def lora_server(tiny_model: Path, adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tiny_model, "--slots", "4", "--ctx", "256", "--served-model-name", "tiny",
                    "--adapter", f"styled={adapter_dir}", log=tmp_path_factory.mktemp("logs") / "lora.log")
    yield server
    server.stop()


def greedy_text(source: Path, prompt: str, n: int, adapter: Path | None = None) -> str:
    import camelid
    from camelid.generate import generate

    llm = camelid.load(source, adapter=adapter)
    ids = llm.tokenizer.encode(prompt, add_bos=llm.tokenizer.add_bos)
    return llm.tokenizer.decode(generate(llm.model, ids, n, stop_ids=llm.tokenizer.stop_ids))


def test_adapter_requests_equal_camelid_load_with_the_adapter(lora_server: Server, tiny_model: Path,
                                                               adapter_dir: Path) -> None:
    client = openai.OpenAI(base_url=f"{lora_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny", "styled"]

    def complete(job: tuple[str, str]) -> str:
        model, prompt = job
        r = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)
        return r.choices[0].text

    jobs = [(model, p) for p in PROMPTS for model in ("tiny", "styled")]
    with ThreadPoolExecutor(len(jobs)) as pool:  # base and adapter sequences share the slots and decode steps
        served = dict(zip(jobs, pool.map(complete, jobs), strict=True))
    for p in PROMPTS:
        base = greedy_text(tiny_model, p, 20)
        adapted = greedy_text(tiny_model, p, 20, adapter=adapter_dir)
        assert base != adapted  # the adapter matters, so the equalities below say something
        assert served["tiny", p] == base
        assert served["styled", p] == adapted
    # the prefix cache holds the same prompts' blocks for both models by now: still each its own
    again = {job: complete(job) for job in jobs[:2]}
    assert again == {job: served[job] for job in jobs[:2]}


def test_an_unknown_adapter_is_a_404_and_a_bad_flag_one_line(lora_server: Server, tiny_model: Path,
                                                              tmp_path: Path) -> None:
    status, _, body = request(lora_server.url, "POST", "/v1/completions",
                              {"model": "other", "prompt": "Emma", "max_tokens": 2})
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "camelid", "serve", str(tiny_model), "--adapter", "nodir"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "NAME=DIR" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "camelid", "serve", str(tiny_model), "--adapter",
                        f"x={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "not a folder" in r.stderr and "Traceback" not in r.stderr
