"""`camelid generate` (one completion, script-friendly) and `camelid chat` (an interactive conversation).

stdout carries the model's text alone; loading, progress and timing go to stderr.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import typer

from camelid import hub
from camelid.cli.app import app
from camelid.errors import CamelidError
from camelid.hub import DEFAULT_MODEL

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", "-m", help="model name (camelid list), HF dir, .gguf or Meta dir")
AdapterOpt = typer.Option(None, "--adapter", help="a LoRA adapter folder (from `camelid finetune` or peft), "
                          "merged into the model's weights")
ImageOpt = typer.Option(None, "--image", "-i", help="a picture for a vision model to look at (PNG, JPEG, ...)")
QuantizeOpt = typer.Option(
    "fp32", "--quantize",
    help="fp32: the same weights, fused, with camelid's C++ decode step (fastest exact path); fp16: 16-bit "
         "weights, fp32 arithmetic (half the memory); int8 / int4: weight-only quantised (faster, measured quality "
         "cost); none: the plain readable model",
)


def _load(model: str, quiet: bool, quantize: str, adapter: str | None = None) -> Any:
    import camelid
    from camelid.ops import native

    if quantize not in ("none", "fp32", "fp16", "int8", "int4"):
        raise CamelidError(f"--quantize {quantize!r}: choose one of none, fp32, fp16, int8, int4")
    t0 = time.perf_counter()
    registered = model in hub.MODELS and hub.MODELS[model].kind in hub.LLM_KINDS
    # a wrong name is the one line on stderr, before anything else is said
    path = None if registered else camelid.llm.resolve(model)
    if quantize != "none" and native.load(wait=False, quiet=quiet) is None:
        if _building(native.reason()):
            _leave_cores_to_the_build()
        if quantize == "fp32":  # fused fp32 modules only pay off through the kernels: the plain model loads faster
            quantize = "none"
    if path is None:  # fetched the first time (saying so unless -q), while the kernels build
        path = hub.pull(model, quiet=quiet)
    if not quiet:
        print(f"camelid: loading {path} ...", file=sys.stderr, flush=True)
    llm = camelid.load(path, quantize=None if quantize == "none" else quantize, adapter=adapter)
    if llm.tokenizer is None:
        raise CamelidError(f"{model}: no tokenizer found beside the weights; text generation needs one (put the "
                           "model's tokenizer.json or tokenizer.model in its folder)")
    if not quiet:
        n = llm.config.num_params()
        print(f"camelid: loaded {llm.config.name} ({n / 1e6:.1f}M parameters) from {llm.source} "
              f"in {time.perf_counter() - t0:.1f}s" + (f", adapter {adapter} merged" if adapter else ""),
              file=sys.stderr)
        if quantize != "none":
            from camelid.variants.decode_step import refusal

            why = refusal(llm.model)
            if why:
                print(f"camelid: {why}; decoding through the per-layer path", file=sys.stderr)
    return llm


def _building(reason: str) -> bool:
    """Whether camelid.ops.native's reason says a build is running (started by this run or another)."""
    return "being built" in reason


def _leave_cores_to_the_build() -> None:
    """While the kernels compile in the background (on MAX_JOBS cores, by default half of them), this run takes
    the rest: PyTorch's threads sharing cores with the compiler slow down both (each parallel region waits
    for its slowest thread)."""
    import os

    import torch

    cores = os.cpu_count() or 1
    jobs = os.environ.get("MAX_JOBS", "")
    jobs_n = int(jobs) if jobs.isdigit() else max(1, cores // 2)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - jobs_n)))


def _picture(llm: Any, image: str | None) -> dict[str, Any]:
    """{"image": the picture's pixels, read once} for a vision model; one-line errors before any generation."""
    return {} if image is None else {"image": llm.image_pixels(image)}


def _report(stats: dict[str, float]) -> None:
    if "first_token" not in stats:
        return
    prefill = stats["first_token"] - stats["start"]
    n = int(stats.get("new_tokens", 0))
    decode = stats["end"] - stats["first_token"]
    rate = f", decode {(n - 1) / decode:.1f} tok/s" if n > 1 and decode > 0 else ""
    print(f"camelid: prompt {int(stats.get('prompt_tokens', 0))} tokens, prefill {prefill:.2f}s; "
          f"{n} new tokens{rate}", file=sys.stderr)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="the prompt; '-' reads it from stdin"),
    model: str = ModelOpt,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1, max=32768),
    temperature: float = typer.Option(0.0, "--temperature", "-t", min=0.0, help="0 is greedy (deterministic)"),
    top_k: int = typer.Option(0, min=0, help="keep the k most likely tokens (0: off)"),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="nucleus sampling mass (1: off)"),
    min_p: float = typer.Option(0.0, min=0.0, max=1.0, help="drop tokens below min_p x the top probability"),
    repetition_penalty: float = typer.Option(1.0, min=0.0),
    seed: int | None = typer.Option(None, help="random seed for sampling"),
    stop: list[str] = typer.Option([], "--stop", help="stop at this string (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt as a user message in the chat template"),
    system: str | None = typer.Option(None, "--system", help="system prompt (with --chat)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="nothing on stderr"),
    quantize: str = QuantizeOpt,
    adapter: str | None = AdapterOpt,
    image: str | None = ImageOpt,
) -> None:
    """Complete PROMPT and print the completion alone on stdout."""
    if system is not None and not chat:
        raise CamelidError("--system is the system prompt of a chat; add --chat (or leave --system out)")
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise CamelidError("the prompt is empty; give some text (or '-' to read it from stdin)")
    llm = _load(model, quiet, quantize, adapter)
    stats: dict[str, float] = {}
    opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed, stop=stop, stats=stats, **_picture(llm, image))
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        pieces = llm.chat_stream(messages, **opts)
    else:
        pieces = llm.stream(prompt, **opts)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if not quiet:
        _report(stats)


CHAT_HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt), /quit (or Ctrl-D)"


def fit_history(llm: Any, messages: list[dict[str, str]], max_new_tokens: int) -> list[dict[str, str]]:
    """Drop the oldest exchanges (never the system prompt or the last message) until the prompt fits."""
    budget = llm.config.max_seq_len - max_new_tokens
    msgs = list(messages)
    while len(llm.chat_prompt(msgs)) > budget:
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            raise CamelidError(f"the last message alone is longer than the context window of "
                               f"{llm.config.max_seq_len} tokens minus {max_new_tokens} for the reply; shorten it")
        del msgs[first]
    return msgs


@app.command()
def chat(
    model: str = ModelOpt,
    system: str | None = typer.Option(None, "--system", "-s", help="system prompt"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1, max=32768),
    temperature: float = typer.Option(0.7, "--temperature", "-t", min=0.0),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0),
    min_p: float = typer.Option(0.0, min=0.0, max=1.0),
    repetition_penalty: float = typer.Option(1.0, min=0.0),
    seed: int | None = typer.Option(None),
    quantize: str = QuantizeOpt,
    adapter: str | None = AdapterOpt,
    image: str | None = ImageOpt,
) -> None:
    """Talk with a model: replies stream as they are generated; the conversation is kept as history."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    llm = _load(model, quiet=False, quantize=quantize, adapter=adapter)
    picture = _picture(llm, image)  # the same picture for the whole conversation
    print(CHAT_HELP, file=sys.stderr)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turn = 0
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit", "/bye"):
            return
        if text == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            new_system = text[len("/system"):].strip()
            messages = [m for m in messages if m["role"] != "system"]
            if new_system:
                messages.insert(0, {"role": "system", "content": new_system})
            print(f"(system prompt {'set' if new_system else 'removed'})", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]!r}; {CHAT_HELP}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            messages = fit_history(llm, messages, max_new_tokens)
        except CamelidError as e:
            messages.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        reply: list[str] = []
        turn += 1
        try:
            for piece in llm.chat_stream(messages, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                         seed=None if seed is None else seed + turn, **picture):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [interrupted]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
