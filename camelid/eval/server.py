"""Evaluate a running OpenAI-compatible server (`camelid serve`, or any server whose /v1/completions returns
the prompt's log-probabilities with `echo`): the Evaluator's token requests go over HTTP instead of through a
local model, so the server's numbers can be set beside `camelid eval`'s.

A scoring request (context, continuation) is sent as the token ids of context + continuation with
`max_tokens: 0, echo: true, logprobs: 1`; the continuation's log-probability is the sum of the last
len(continuation) `token_logprobs`, and it is greedy where each of those equals the top log-probability.
Prompts are tokenised locally by the model's own tokenizer (checked against the server's /tokenize when the
server has one), as lm-eval's `local-completions` model does.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from camelid.errors import CamelidError
from camelid.eval.engine import Request, scored_tokens
from camelid.tokenizer import Tokenizer

PROBE = "Question: Is the sky blue?\nAnswer: Yes, it is.\n\n  Émile's café, 12:45."


class ServerLLM:
    """A model behind `url`: its served name, its context length (from GET /v1/models) and a local tokenizer."""

    def __init__(self, url: str, tokenizer: Tokenizer, *, api_key: str | None = None, model: str | None = None,
                 prompts_per_request: int = 16, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.api_key, self.timeout, self.prompts_per_request = api_key, timeout, prompts_per_request
        self.tokenizer = tokenizer
        listed = self._call("GET", "/v1/models")["data"]
        if not listed:
            raise CamelidError(f"{self.url}/v1/models lists no model")
        entry = next((m for m in listed if m["id"] == model), None) if model else listed[0]
        if entry is None:
            raise CamelidError(f"{self.url} does not serve {model!r}; it serves {', '.join(m['id'] for m in listed)}")
        self.model_name: str = entry["id"]
        self.context_length: int | None = entry.get("max_model_len")
        self.source = f"{self.url} ({self.model_name})"
        self._check_tokenizer()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise CamelidError(f"{self.url}{path}: HTTP {e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            raise CamelidError(f"cannot reach the server at {self.url} ({getattr(e, 'reason', e)}); "
                               "is `camelid serve` running there?") from None

    def _check_tokenizer(self) -> None:
        try:
            theirs = self._call("POST", "/tokenize", {"prompt": PROBE})["tokens"]
        except CamelidError as e:
            if "HTTP 404" in str(e):
                return  # a server without /tokenize: trust the tokenizer given
            raise
        ours = self.tokenizer.encode(PROBE, add_bos=self.tokenizer.add_bos)
        if theirs != ours:
            raise CamelidError(f"the server's tokenizer differs from the local one ({len(theirs)} vs {len(ours)} "
                               "tokens for a test sentence); pass the served model with -m")

    def score(self, requests: Sequence[Request], *, max_length: int,
              on_tokens: Callable[[int, int], None] | None = None, stats: dict[str, int] | None = None
              ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) per request, sequences cut from the left to max_length + 1
        tokens (as camelid.eval.engine.loglikelihood)."""
        prompts = []
        for r in requests:
            prompts.append(scored_tokens(r, max_length)[0])
        total = sum(len(p) for p in prompts)
        if stats is not None:
            stats["tokens_requested"] = stats.get("tokens_requested", 0) + total - len(prompts)
        out: list[tuple[float, bool]] = []
        done = 0
        for i in range(0, len(prompts), self.prompts_per_request):
            batch = prompts[i:i + self.prompts_per_request]
            body = {"model": self.model_name, "prompt": batch, "max_tokens": 0, "echo": True, "logprobs": 1,
                    "temperature": 0.0}
            choices = sorted(self._call("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
            if len(choices) != len(batch):
                raise CamelidError(f"{self.url}/v1/completions answered {len(choices)} choices for {len(batch)} "
                                   "prompts")
            for prompt, choice, r in zip(batch, choices, requests[i:i + len(batch)], strict=True):
                n = len(r.continuation)
                lp = choice.get("logprobs") or {}
                chosen, top = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
                if len(chosen) < len(prompt) or any(x is None for x in chosen[-n:]):
                    raise CamelidError(f"{self.url}/v1/completions did not return the prompt's log-probabilities "
                                       "(it needs echo with logprobs and max_tokens 0)")
                chosen, top = chosen[len(prompt) - n:len(prompt)], top[len(prompt) - n:len(prompt)]
                greedy = all(t is not None and lp_ >= max(t.values()) for lp_, t in zip(chosen, top, strict=True))
                out.append((float(sum(chosen)), greedy))
            done += sum(len(p) for p in batch)
            if on_tokens is not None:
                on_tokens(done, total)
        return out

    def generate(self, ids: list[int], *, max_new_tokens: int, stop: Sequence[str] = ()) -> str:
        """Greedy continuation of the token ids, cut before the first stop string."""
        body: dict[str, Any] = {"model": self.model_name, "prompt": ids, "max_tokens": max_new_tokens,
                                "temperature": 0.0}
        if stop:
            body["stop"] = list(stop)[:4]  # OpenAI's limit
        return self._call("POST", "/v1/completions", body)["choices"][0]["text"]
