"""The HTTP side of `camelid serve`: OpenAI's API over the engine (FastAPI, server-sent events), the web chat at /,
and the guards: API key, body size, prompt and generation bounds, a bounded queue (429).

Endpoints: POST /v1/chat/completions and /v1/completions (streamed or not; n, logprobs, echo with the prompt's
log-probabilities, stop strings, seed, response_format), GET /v1/models, POST /v1/embeddings, POST /tokenize and
/detokenize, GET /health, GET /metrics (Prometheus), GET / (the chat page). Every error is OpenAI's
{"error": {...}} object with a 4xx status for what the client can fix.

The server keeps no state between requests (a conversation travels in each request; the prefix cache only
makes repeated prefixes faster), so replicas behind an ordinary load balancer serve the same API.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from camelid.errors import CamelidError
from camelid.generate import SamplingParams
from camelid.serve.engine import Done, Engine, PromptLogprobs, QueueFull, Sequence, Token
from camelid.serve.metrics import ServerMetrics
from camelid.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    Sampling,
    TokenizeRequest,
    error_body,
    validation_message,
)
from camelid.serve.structured import Grammars
from camelid.tokenizer import StreamDecoder, Tokenizer

PUBLIC_PATHS = {"/health", "/", "/favicon.ico"}  # no API key: the page holds no data, it asks for the key


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096  # per choice
    request_timeout: float = 600.0  # seconds per request, then finish_reason "length"
    max_embedding_inputs: int = 256


@dataclass
class Served:
    """What the app serves: the engine's model and tokenizer under a name, and an optional embedding model."""

    name: str
    engine: Engine
    tokenizer: Tokenizer
    embed: Callable[[list[list[int]] | list[str]], tuple[list[list[float]], int]] | None = None
    embed_name: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA adapter name -> its folder (the engine's models)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


class Guard:
    """Pure ASGI, outermost: the API key (every path but PUBLIC_PATHS), the body size (413 by Content-Length or
    while the body streams in), and the request counter by endpoint and status. (Pure ASGI rather than
    Starlette's BaseHTTPMiddleware, which would stand between a streaming response and the client's
    disconnect.)"""

    def __init__(self, app: ASGIApp, api_key: str | None, max_bytes: int, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.max_bytes, self.metrics = app, api_key, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"
        status = "500"

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            headers = dict(scope["headers"])
            if self.api_key and path not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
                given = headers.get(b"authorization", b"")
                if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                    response = _error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                      code="invalid_api_key")
                    await response(scope, receive, counted_send)
                    return
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                response = _error(413, f"the request body is larger than {self.max_bytes} bytes",
                                  code="body_too_large")
                await response(scope, receive, counted_send)
                return
            seen = 0

            async def limited_receive() -> Message:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_bytes:
                        raise ApiError(413, f"the request body is larger than {self.max_bytes} bytes",
                                       code="body_too_large")
                return message

            await self.app(scope, limited_receive, counted_send)
        finally:
            self.metrics.requests.labels(endpoint, status).inc()


class TextCutter:
    """A choice's text as its tokens arrive: decoded without splitting characters, and cut before the first
    stop string (text that could begin one is held back until it cannot)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stop, self.hold = stop, max((len(x) for x in stop), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def push(self, token: int) -> str:
        return self._release(self.decoder.push(token), final=False)

    def finish(self) -> str:
        return "" if self.stopped else self._release(self.decoder.flush(), final=True)

    def _release(self, piece: str, final: bool) -> str:
        self.buffer += piece
        hits = [i for i in (self.buffer.find(x) for x in self.stop) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[: min(hits)], "", True
            return out
        keep = 0 if final else min(self.hold, len(self.buffer))
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return out


@dataclass(eq=False)
class Choice:
    seq: Sequence | None = None
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None
    echo: str = ""
    prompt_scores: PromptLogprobs | None = None
    share_prompt_with: list[Choice] = field(default_factory=list)


class Mailbox:
    """Events from the engine thread to one event loop: a wake-up of the loop carries every event posted since
    the last, so a decode step of B sequences wakes it once rather than B times."""

    _of_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)  # (a strong one, from the dictionary's value, would keep every loop alive)
        self.items: deque[tuple[asyncio.Queue, Any]] = deque()
        self.scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Mailbox:
        if loop not in cls._of_loop:
            cls._of_loop[loop] = cls(loop)
        return cls._of_loop[loop]

    def post(self, queue: asyncio.Queue, item: Any) -> None:  # any thread
        self.items.append((queue, item))
        loop = self.loop()
        if not self.scheduled and loop is not None:
            self.scheduled = True
            loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # on the loop
        self.scheduled = False  # before draining: an item posted from now on schedules the next delivery
        while self.items:
            queue, item = self.items.popleft()
            queue.put_nowait(item)


class Run:
    """One request's sequences on the engine, as the events of its choices arrive (on the event loop)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, stop: list[str], n_choices: int) -> None:
        self.engine, self.n_choices = engine, n_choices
        self.loop = asyncio.get_running_loop()
        self.mailbox = Mailbox.of(self.loop)
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.choices = [Choice() for _ in range(n_choices)]
        self.cutters = [TextCutter(tokenizer, stop) for _ in range(n_choices)]
        self.request: Request | None = None

    def emit_for(self, i: int) -> Callable[[Any], None]:
        def emit(event: Any) -> None:  # on the engine thread
            self.mailbox.post(self.queue, (i, event))

        return emit

    def start(self, seqs: list[Sequence], request: Request) -> None:
        for c, seq in zip(self.choices, seqs, strict=True):
            c.seq = seq
        self.request = request
        self.engine.submit(seqs)

    def cancel(self) -> None:
        for c in self.choices:
            if c.seq is not None and c.finish_reason is None:
                self.engine.cancel(c.seq)

    async def _next(self, watch_disconnect: bool) -> tuple[int, Any]:
        if not watch_disconnect:
            return await self.queue.get()
        while True:  # a non-streamed request: free the slots as soon as the client is gone
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if self.request is not None and await self.request.is_disconnected():
                    raise ApiError(499, "the client closed the connection", code="client_closed") from None

    async def deltas(self, watch_disconnect: bool = False) -> AsyncIterator[tuple[int, str, list[Token], str | None]]:
        """(choice, new text, new tokens, finish reason or None) until every choice has finished; the
        sequences still running are cancelled when this ends early (a client gone, an error)."""
        remaining = self.n_choices
        try:
            while remaining:
                i, event = await self._next(watch_disconnect)
                c, cutter = self.choices[i], self.cutters[i]
                if c.finish_reason is not None:
                    continue  # the rest of a sequence a stop string ended
                if isinstance(event, PromptLogprobs):
                    for other in [c, *c.share_prompt_with]:
                        other.prompt_scores = event
                elif isinstance(event, Token):
                    text = cutter.push(event.id)
                    c.tokens.append(event)
                    if cutter.stopped:
                        self.engine.cancel(c.seq)
                        c.finish_reason = "stop"
                        remaining -= 1
                    c.text += text
                    yield i, text, [event], c.finish_reason
                elif isinstance(event, Done):
                    if event.reason == "error":
                        raise ApiError(500, event.message, "server_error")
                    if event.reason == "cancelled":
                        raise ApiError(503, event.message or "the request was cancelled", "server_error")
                    text = cutter.finish()
                    c.text += text
                    c.finish_reason = event.reason
                    remaining -= 1
                    yield i, text, [], c.finish_reason
        finally:
            self.cancel()

    async def wait(self) -> None:
        async for _ in self.deltas(watch_disconnect=True):
            pass

    def usage(self) -> dict[str, Any]:
        firsts = {id(c.seq.prompt): c.seq for c in self.choices if c.seq is not None}  # one per distinct prompt
        prompt = sum(len(s.prompt) for s in firsts.values())
        completion = sum(len(c.tokens) for c in self.choices)
        cached = sum(s.cached_tokens for s in firsts.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


def stop_strings(body: Sampling) -> list[str]:
    try:
        return body.stop_strings()
    except ValueError as e:
        raise ApiError(400, str(e), param="stop") from e


def completion_prompts(tok: Tokenizer, prompt: Any) -> tuple[list[str], list[list[int]]]:
    """/v1/completions' prompt (a text, texts, token ids or lists of them) -> (texts to echo, token lists)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    texts, ids = [], []
    for p in prompt:
        if isinstance(p, str):
            texts.append(p)
            ids.append(tok.encode(p, add_bos=tok.add_bos))
        else:
            bad = next((t for t in p if not 0 <= t < tok.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary", param="prompt")
            texts.append(tok.decode(p))
            ids.append(list(p))
        if not ids[-1]:
            raise ApiError(400, "prompt is empty (and this model adds no BOS token)", param="prompt")
    return texts, ids


def chat_logprob(tok: Tokenizer, t: Token) -> dict[str, Any]:
    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        piece = tok.decode([token])
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    return {**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top or []]}


def completion_logprobs(tok: Tokenizer, prompt: list[int] | None, c: Choice, echo: bool) -> dict[str, Any]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset (with echo,
    the prompt's tokens first; the first prompt token has no log-probability)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0

    def add(token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        nonlocal offset
        piece = tok.decode([token])
        out["tokens"].append(piece)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(None if top is None else {tok.decode([i]): lp for i, lp in top})
        out["text_offset"].append(offset)
        offset += len(piece)

    if echo and prompt is not None:
        scores = c.prompt_scores
        for j, token in enumerate(prompt):
            add(token, scores.logprobs[j] if scores else None, scores.top[j] if scores else None)
    for t in c.tokens:
        add(t.id, t.logprob, t.top)
    return out


def mean_pooled(engine: Engine, ids: list[list[int]]) -> list[list[float]]:
    """LLaMA embeddings: the mean of the final-norm hidden states over the tokens, L2-normalised (engine thread)."""
    out = []
    for x in ids:
        h = engine.model.hidden_states(torch.tensor([x], device=engine.kv.device))[0].float()
        out.append(F.normalize(h.mean(0), dim=-1).tolist())
    return out


def sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events: one `data: {json}` per chunk, then `data: [DONE]`; an error after the stream has
    begun is sent as an `error` chunk."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(served: Served, *, limits: Limits | None = None, api_key: str | None = None,
               cors_origins: list[str] | None = None, metrics: ServerMetrics | None = None) -> FastAPI:
    limits = limits or Limits()
    metrics = metrics or ServerMetrics()
    engine, tok = served.engine, served.tokenizer
    grammars = Grammars(tok, engine.model.config.vocab_size)
    app = FastAPI(title="camelid serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.metrics = served, metrics
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])

    # -- guards and errors ----------------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, e: QueueFull) -> JSONResponse:
        return _error(429, str(e), "rate_limit_exceeded", code="rate_limit_exceeded")

    @app.exception_handler(CamelidError)
    async def camelid_error(_: Request, e: CamelidError) -> JSONResponse:
        return _error(400, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        body = await request.body()
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from e
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            message, param = validation_message(e)
            raise ApiError(400, message, param=param) from e

    def check_model(name: str | None) -> str:
        names = [served.name, *served.adapters]
        if name is None or name in names:
            return name or served.name
        raise ApiError(404, f"model {name!r} is not served here; GET /v1/models lists {', '.join(names)}",
                       param="model", code="model_not_found")

    # -- generation -----------------------------------------------------------------------------------------------
    def sequences(body: Sampling, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None,
                  prompt_logprobs: bool, emit_for: Callable[[int], Callable[[Any], None]]) -> list[Sequence]:
        if body.response_format is not None and body.response_format.type != "text" and prompt_logprobs:
            raise ApiError(400, "response_format cannot be combined with echo", param="response_format")
        bias: dict[int, float] = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < tok.vocab_size:
                raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model", param="logit_bias")
            bias[int(key)] = max(-100.0, min(100.0, value))
        params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                min_p=body.min_p, repetition_penalty=body.repetition_penalty)
        adapter = body.model if body.model in served.adapters and body.model != served.name else None
        seqs = []
        for p, prompt in enumerate(prompts):
            bad = next((t for t in prompt if not 0 <= t < engine.model.config.vocab_size), None)
            if bad is not None:
                raise ApiError(400, f"token id {bad} is outside the vocabulary", param="prompt")
            room = engine.context - len(prompt)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens or 1}) exceeds "
                                    f"the context of {engine.context} tokens; shorten the prompt or lower max_tokens",
                               param="messages" if isinstance(body, ChatRequest) else "prompt",
                               code="context_length_exceeded")
            n_new = min(max_tokens if max_tokens is not None else room, room, limits.max_tokens)
            for j in range(body.n):
                i = p * body.n + j
                constraint = grammars.matcher(body.response_format.as_dict()) if body.response_format else None
                seqs.append(Sequence(
                    prompt=prompt, max_tokens=n_new, emit=emit_for(i), params=params,
                    seed=None if body.seed is None else body.seed + j, stop_ids=frozenset(tok.stop_ids),
                    logprobs=logprobs, prompt_logprobs=prompt_logprobs and j == 0, logit_bias=bias,
                    presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                    constraint=constraint, timeout=limits.request_timeout, adapter=adapter))
        return seqs

    def check_max_tokens(value: int | None) -> None:
        if value is not None and value > limits.max_tokens:
            raise ApiError(400, f"max_tokens {value} is above this server's limit of {limits.max_tokens}",
                           param="max_tokens")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body: ChatRequest = await parse(request, ChatRequest)
        model = check_model(body.model)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        check_max_tokens(max_tokens)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True)
        except CamelidError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from e
        starts_with_bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
        prompt = tok.encode(text, add_bos=tok.add_bos and not starts_with_bos)
        top = body.top_logprobs or 0
        run = Run(engine, tok, stop_strings(body), n_choices=body.n)
        seqs = sequences(body, [prompt], max_tokens, top if body.logprobs else None, False, run.emit_for)
        run.start(seqs, request)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse(chat_stream(run, rid, created, model, body.logprobs, include_usage))
        await run.wait()
        choices = []
        for i, c in enumerate(run.choices):
            choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": c.text},
                                      "logprobs": None, "finish_reason": c.finish_reason}
            if body.logprobs:
                choice["logprobs"] = {"content": [chat_logprob(tok, t) for t in c.tokens]}
            choices.append(choice)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "choices": choices, "usage": run.usage(), "system_fingerprint": None})

    async def chat_stream(run: Run, rid: str, created: int, model: str, logprobs: bool,
                          include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choices, "system_fingerprint": None}
            if include_usage:
                out["usage"] = None
            return out

        for i in range(run.n_choices):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for i, text, tokens, finish in run.deltas():
            choice: dict[str, Any] = {"index": i, "delta": {"content": text} if text else {}, "logprobs": None,
                                      "finish_reason": finish}
            if logprobs and tokens:
                choice["logprobs"] = {"content": [chat_logprob(tok, t) for t in tokens]}
            yield chunk([choice])
        if include_usage:
            final = chunk([])
            final["usage"] = run.usage()
            yield final

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = await parse(request, CompletionRequest)
        model = check_model(body.model)
        check_max_tokens(body.max_tokens)
        if body.suffix:
            raise ApiError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise ApiError(400, "best_of other than n is not supported", param="best_of")
        texts, prompts = completion_prompts(tok, body.prompt)
        run = Run(engine, tok, stop_strings(body), n_choices=len(prompts) * body.n)
        if body.echo:
            for p, text in enumerate(texts):
                for j in range(body.n):
                    run.choices[p * body.n + j].echo = text
        seqs = sequences(body, prompts, body.max_tokens, body.logprobs, body.echo and body.logprobs is not None,
                         run.emit_for)
        if body.echo and body.logprobs is not None:  # every choice of a prompt shares its first choice's scores
            for p in range(len(prompts)):
                run.choices[p * body.n].share_prompt_with = [run.choices[p * body.n + j] for j in range(body.n)]
        run.start(seqs, request)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return sse(completion_stream(run, rid, created, model, body, prompts, include_usage))
        await run.wait()
        choices = []
        for i, c in enumerate(run.choices):
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(tok, prompts[i // body.n] if body.echo else None, c, body.echo)
            choices.append({"index": i, "text": c.echo + c.text, "logprobs": lp, "finish_reason": c.finish_reason})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": choices, "usage": run.usage(), "system_fingerprint": None})

    async def completion_stream(run: Run, rid: str, created: int, model: str, body: CompletionRequest,
                                prompts: list[list[int]], include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                   "system_fingerprint": None}
            if include_usage:
                out["usage"] = None
            return out

        echoed = [False] * run.n_choices
        async for i, text, tokens, finish in run.deltas():
            c = run.choices[i]
            lp = None
            if body.logprobs is not None:
                part = Choice(tokens=tokens)
                if body.echo and not echoed[i]:
                    part.prompt_scores = c.prompt_scores
                lp = completion_logprobs(tok, prompts[i // body.n] if body.echo and not echoed[i] else None, part,
                                         body.echo and not echoed[i])
            if body.echo and not echoed[i]:
                text, echoed[i] = c.echo + text, True
            yield chunk([{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}])
        if include_usage:
            final = chunk([])
            final["usage"] = run.usage()
            yield final

    # -- other endpoints -------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models() -> JSONResponse:
        names = [served.name, *served.adapters] + ([served.embed_name] if served.embed_name else [])
        created = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "camelid",
             "max_model_len": engine.context} for n in dict.fromkeys(names)]})

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body: EmbeddingRequest = await parse(request, EmbeddingRequest)
        if body.model is not None and body.model not in (served.name, served.embed_name):
            raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists the models",
                           param="model", code="model_not_found")
        if body.dimensions is not None:
            raise ApiError(400, "dimensions is not supported: the embedding has the model's width",
                           param="dimensions")
        inputs: list[Any] = [body.input] if isinstance(body.input, str) or (
            body.input and isinstance(body.input[0], int)) else list(body.input)
        if not inputs or len(inputs) > limits.max_embedding_inputs:
            raise ApiError(400, f"input: give 1 to {limits.max_embedding_inputs} texts", param="input")
        if any(len(x) == 0 for x in inputs):
            raise ApiError(400, "input: an empty text or token list cannot be embedded", param="input")
        use_bert = served.embed is not None and body.model in (None, served.embed_name)
        if use_bert:
            vectors, n_tokens = await asyncio.get_running_loop().run_in_executor(None, served.embed, inputs)
            name = served.embed_name or served.name
        else:
            ids = [x if isinstance(x, list) else tok.encode(x, add_bos=tok.add_bos) for x in inputs]
            if any(len(x) > engine.context for x in ids):
                raise ApiError(400, f"input: a text is longer than the context of {engine.context} tokens",
                               param="input")
            if any(not 0 <= t < engine.model.config.vocab_size for x in ids for t in x):
                raise ApiError(400, "input: a token id is outside the vocabulary", param="input")
            vectors = await asyncio.wrap_future(engine.run(lambda: mean_pooled(engine, ids)))
            n_tokens, name = sum(len(x) for x in ids), served.name
        data = []
        for i, v in enumerate(vectors):
            emb: Any = v
            if body.encoding_format == "base64":
                emb = base64.b64encode(np.asarray(v, dtype=np.float32).tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return JSONResponse({"object": "list", "data": data, "model": name,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body: TokenizeRequest = await parse(request, TokenizeRequest)
        if body.messages is not None:
            text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages],
                                           add_generation_prompt=True)
            starts_with_bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
            ids = tok.encode(text, add_bos=body.add_special_tokens and tok.add_bos and not starts_with_bos)
        else:
            text = body.prompt if body.prompt is not None else body.content
            if text is None:
                raise ApiError(400, "give prompt (a text) or messages", param="prompt")
            ids = tok.encode(text, add_bos=body.add_special_tokens and tok.add_bos)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.context})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body: DetokenizeRequest = await parse(request, DetokenizeRequest)
        text = tok.decode(body.tokens)
        return JSONResponse({"prompt": text, "content": text})

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        def state() -> dict[str, float]:
            pc = engine.prefix_cache
            return {"queue_depth": engine.queue_depth(), "running": len(engine.running),
                    "kv_usage": engine.cache_usage(),
                    "prefix_hit_ratio": pc.hits / pc.lookups if pc is not None and pc.lookups else 0.0}

        return Response(metrics.render(state), media_type="text/plain; version=0.0.4; charset=utf-8")

    page = resources.files("camelid.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP})

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    app.add_middleware(Guard, api_key=api_key, max_bytes=limits.max_body_bytes, metrics=metrics)
    return app


# the page's scripts and styles are inline; nothing else is loaded, and model output is never parsed as HTML
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src data:; base-uri 'none'; form-action 'none'")
KNOWN_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/embeddings", "/tokenize",
               "/detokenize", "/health", "/metrics", "/"}
