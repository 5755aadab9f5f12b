"""The official `openai` client against a live `camelid serve` (a tiny random model: fast, the text is noise):
chat and completions, streamed and not, the same either way; stop strings, n, logprobs, echo; the other
endpoints; every client error a 4xx in OpenAI's error format; the API key, CORS and the bounded queue."""

from __future__ import annotations

import base64
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from serve_helpers import Server, request

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me about Emma."}]


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_streamed_equals_non_streamed(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    assert 0 < whole.usage.completion_tokens <= 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    tokens = request(client.base_url.__str__().removesuffix("/v1/"), "POST", "/tokenize", {"messages": MESSAGES})
    assert json.loads(tokens[2])["count"] == whole.usage.prompt_tokens


def test_completions_streamed_equal_non_streamed_and_length(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="tiny", prompt="It was a fine morning", max_tokens=20, temperature=0)
    assert whole.object == "text_completion"
    text = whole.choices[0].text
    parts = list(client.completions.create(model="tiny", prompt="It was a fine morning", max_tokens=20,
                                           temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == text
    if whole.choices[0].finish_reason == "length":
        assert whole.usage.completion_tokens == 20


def test_batched_prompts_n_and_seeds(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt=["Emma", "Mr. Knightley"], n=2, max_tokens=12,
                                  temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="tiny", prompt=["Emma", "Mr. Knightley"], n=2, max_tokens=12,
                                      temperature=1.0, seed=5)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: reproducible
    streamed = client.completions.create(model="tiny", prompt=["Emma", "Mr. Knightley"], n=2, max_tokens=12,
                                         temperature=1.0, seed=5, stream=True)
    texts = ["", "", "", ""]
    for part in streamed:
        for c in part.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in r.choices]


def test_stop_strings_cut_the_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="She said", max_tokens=40, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    cut = client.completions.create(model="tiny", prompt="She said", max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    parts = client.completions.create(model="tiny", prompt="She said", max_tokens=40, temperature=0, stop=stop,
                                      stream=True)
    assert "".join(p.choices[0].text for p in parts) == full[: full.index(stop)]


def test_logprobs_and_echo(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the most likely token
        assert [t.logprob for t in entry.top_logprobs] == sorted([t.logprob for t in entry.top_logprobs],
                                                                 reverse=True)
    prompt = "Emma Woodhouse, handsome, clever, and rich"
    e = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    lp = e.choices[0].logprobs
    assert e.choices[0].text.startswith(prompt)
    n_prompt = e.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + e.usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]) == prompt
    zero = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert zero.choices[0].text == prompt and zero.choices[0].logprobs.token_logprobs == lp.token_logprobs[:n_prompt]


def test_models_tokenize_embeddings_health_metrics(client: openai.OpenAI, tiny_server: Server,
                                                   tiny_model: Path) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny", "all-minilm-l6-v2"]
    status, _, body = request(tiny_server.url, "POST", "/tokenize", {"prompt": "Emma was happy."})
    ids = json.loads(body)["tokens"]
    assert status == 200 and ids
    status, _, body = request(tiny_server.url, "POST", "/detokenize", {"tokens": ids})
    assert json.loads(body)["prompt"] == "Emma was happy."
    emb = client.embeddings.create(model="tiny", input=["Emma was happy.", "Emma was happy.", "Harriet"])
    a, b, c = (d.embedding for d in emb.data)
    assert len(a) == 64 and a == b and a != c
    assert sum(x * x for x in a) == pytest.approx(1.0, abs=1e-4)
    import camelid  # the served LLaMA's own final-norm states, mean-pooled and normalised

    llm = camelid.load(str(tiny_model), quantize=None)
    ids = llm.tokenizer.encode("Harriet", add_bos=llm.tokenizer.add_bos)
    with torch.no_grad():
        want = F.normalize(llm.model.hidden_states(torch.tensor([ids]))[0].mean(0), dim=-1)
    torch.testing.assert_close(torch.tensor(c), want, atol=1e-5, rtol=1e-4)
    assert request(tiny_server.url, path="/health")[0] == 200
    status, headers, body = request(tiny_server.url, path="/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("camelid_requests_total", "camelid_queue_depth", "camelid_time_to_first_token_seconds_bucket",
                 "camelid_inter_token_latency_seconds_bucket", "camelid_generation_tokens_total",
                 "camelid_kv_cache_usage_ratio", "camelid_generation_tokens_per_second"):
        assert name in text
    assert 'camelid_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_bert_embeddings_equal_sentence_transformers_recipe(client: openai.OpenAI, minilm_dir: Path) -> None:
    """--embedding-model all-minilm-l6-v2: the vectors are transformers' BertModel states, mean-pooled over the
    real tokens and L2-normalised (sentence-transformers' recipe), with transformers' own tokenizer."""
    import transformers

    texts = ["Emma was happy.", "Mr. Knightley walked to Hartfield in the rain.", "Harriet"]
    emb = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    got = torch.tensor([d.embedding for d in emb.data])
    ref = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    batch = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = ref(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    want = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert emb.model == "all-minilm-l6-v2" and emb.usage.prompt_tokens == int(batch["attention_mask"].sum())
    b64 = client.embeddings.create(model="all-minilm-l6-v2", input="Harriet", encoding_format="base64").data[0]
    vector = b64.embedding if isinstance(b64.embedding, list) else \
        np.frombuffer(base64.b64decode(b64.embedding), dtype=np.float32).tolist()
    assert vector == pytest.approx(got[2].tolist(), abs=1e-6)


def test_client_errors_are_4xx_in_openai_format(client: openai.OpenAI, tiny_server: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=3)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5000)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Emma " * 300, max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="tiny", prompt=[1, 2, 10**6])
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "xml"})
    for body, status in [(b"{not json", 400), (b"[1, 2]", 400), (json.dumps({"prompt": 5}).encode(), 400),
                         (b"x" * (65 << 10), 413)]:
        code, _, raw = request(tiny_server.url, "POST", "/v1/completions", body)
        err = json.loads(raw)["error"]
        assert code == status and err["message"] and err["type"]
    code, _, raw = request(tiny_server.url, "GET", "/v1/nothing")
    assert code == 404 and "error" in json.loads(raw)
    assert "access-control-allow-origin" not in request(tiny_server.url, "GET", "/v1/models",
                                                        headers={"Origin": "http://evil.test"})[1]


def test_a_client_gone_mid_stream_frees_its_slot(tiny_server: Server) -> None:
    body = json.dumps({"model": "tiny", "prompt": "Emma", "max_tokens": 200, "stream": True,
                       "temperature": 0.9}).encode()
    with socket.create_connection(("127.0.0.1", tiny_server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        seen = b""
        while b"data: " not in seen:  # the headers, then the first tokens
            seen += s.recv(4096)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = request(tiny_server.url, path="/metrics")[2].decode()
        if 'camelid_sequences_finished_total{reason="cancelled"}' in metrics and \
                "camelid_sequences_running 0.0" in metrics:
            return
        time.sleep(0.1)
    raise AssertionError("the slot of a disconnected client was not freed")


def test_api_key_cors_and_the_bounded_queue(tiny_model, tmp_path) -> None:  # noqa: ANN001 - fixtures
    server = Server(tiny_model, "--slots", "1", "--max-queue", "1", "--cors-origin", "http://chat.test",
                    log=tmp_path / "key.log", env={"CAMELID_API_KEY": "s3cret"})
    try:
        assert request(server.url, path="/health")[0] == 200  # public
        assert request(server.url, path="/")[0] == 200  # the page asks for the key itself
        code, _, raw = request(server.url, path="/v1/models")
        assert code == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert ok.models.list().data[0].id == str(tiny_model)
        headers = request(server.url, "GET", "/v1/models", headers={"Origin": "http://chat.test",
                                                                  "Authorization": "Bearer s3cret"})[1]
        assert headers["access-control-allow-origin"] == "http://chat.test"
        from camelid.tokenizer import Tokenizer

        no_end = {str(i): -100 for i in Tokenizer.from_dir(tiny_model).stop_ids}  # 400 tokens each, surely

        def complete(_: int) -> str:
            try:
                ok.completions.create(prompt="Emma", max_tokens=400, temperature=1.0, logit_bias=no_end,
                                      model=str(tiny_model))
                return "ok"
            except openai.RateLimitError:
                return "429"

        with ThreadPoolExecutor(6) as pool:  # one slot, one queue place: at least 4 of 6 are turned away
            results = list(pool.map(complete, range(6)))
        assert results.count("429") >= 4 and results.count("ok") >= 2, results
    finally:
        server.stop()
