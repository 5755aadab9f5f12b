"""The default model (SmolLM2-135M-Instruct) behind `camelid serve`, checked against references outside the
server: its greedy replies equal `camelid generate`'s, its echoed prompt log-probabilities equal the reference
model's own, and JSON-schema replies parse and validate."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
import torch
import torch.nn.functional as F
from serve_helpers import Server

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def client(smollm2_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_server.url}/v1", api_key="unused", max_retries=0, timeout=600)


def test_greedy_replies_equal_camelid_generate(client: openai.OpenAI) -> None:
    """The CLI for one question, the same library call (camelid.load(...).chat) for the others; all three
    requests run at once, so they share decode steps (and the chat template's system prompt, cached)."""
    import camelid

    def ask(q: str) -> str:
        r = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=32,
                                           messages=[{"role": "user", "content": q}])
        return r.choices[0].message.content

    with ThreadPoolExecutor(3) as pool:
        served = list(pool.map(ask, QUESTIONS))
    cli = subprocess.run([sys.executable, "-m", "camelid", "generate", QUESTIONS[0], "--chat", "-n", "32", "-q"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    assert served[0] == cli.removesuffix("\n")
    llm = camelid.load("smollm2-135m-instruct", quantize="fp32")
    for q, text in zip(QUESTIONS[1:], served[1:], strict=True):
        assert text == llm.chat([{"role": "user", "content": q}], max_new_tokens=32)


def test_echoed_prompt_logprobs_equal_the_models_own(client: openai.OpenAI) -> None:
    import camelid

    prompt = "The quick brown fox jumps over the lazy dog. Emma Woodhouse, handsome, clever, and rich,"
    r = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=1, temperature=0,
                                  echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    llm = camelid.load("smollm2-135m-instruct", quantize=None)  # the plain reference model
    ids = llm.tokenizer.encode(prompt, add_bos=llm.tokenizer.add_bos)
    with torch.no_grad():
        want = F.log_softmax(llm.model(torch.tensor([ids]))[0].float(), dim=-1)
    n = len(ids)
    assert r.usage.prompt_tokens == n and lp.token_logprobs[0] is None
    for j in range(1, n):
        assert lp.token_logprobs[j] == pytest.approx(float(want[j - 1, ids[j]]), abs=1e-4)
    assert lp.token_logprobs[n] == pytest.approx(float(want[n - 1].max()), abs=1e-4)  # the greedy new token


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 120},
                         "city": {"type": "string", "maxLength": 24}}}
ITEMS = {"type": "object", "additionalProperties": False, "required": ["items"],
         "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3,
                                  "items": {"type": "string", "maxLength": 16}}}}
SUBJECTS = ["a teacher", "a baker", "a pilot", "a doctor", "a farmer", "a painter", "a sailor", "a chef", "a nurse",
            "a poet"]


def test_json_schema_replies_parse_and_validate(client: openai.OpenAI) -> None:
    """20 prompts, 10 per schema, sampled at temperature 0.7: every reply is JSON that validates."""
    jobs = [(f"Describe {s} as JSON with name, age and city.", PERSON) for s in SUBJECTS] + \
           [(f"List up to three tools {s} uses, as JSON.", ITEMS) for s in SUBJECTS]

    def ask(job: tuple[str, dict]) -> tuple[str, str]:
        question, schema = job
        r = client.chat.completions.create(
            model="smollm2-135m-instruct", temperature=0.7, seed=1, max_tokens=96,
            messages=[{"role": "user", "content": question}],
            response_format={"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}})
        return r.choices[0].message.content, r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, jobs))
    for (text, finish), (_, schema) in zip(replies, jobs, strict=True):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)
    mode = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=64,
                                          messages=[{"role": "user", "content": "Give me a JSON object."}],
                                          response_format={"type": "json_object"})
    assert isinstance(json.loads(mode.choices[0].message.content), dict)
