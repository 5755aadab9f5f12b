"""`camelid generate` in scripts and `camelid chat` in a real terminal (tmux), on the default model."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

import camelid


def run_cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "camelid", *args], input=stdin, capture_output=True, text=True,
                          timeout=600, env=None if env is None else {**os.environ, **env}, cwd=cwd)


@pytest.fixture(scope="module")
def llm() -> camelid.LLM:
    return camelid.load("smollm2-135m-instruct")


def test_generate_prints_the_completion_alone(llm: camelid.LLM) -> None:
    prompt = "The three primary colours are"
    r = run_cli("generate", prompt, "-n", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout == llm.generate(prompt, max_new_tokens=12) + "\n"
    assert "loaded" in r.stderr and "tok/s" in r.stderr
    r = run_cli("generate", prompt, "-n", "12", "--stop", ",")
    assert r.returncode == 0, r.stderr
    assert r.stdout == llm.generate(prompt, max_new_tokens=12, stop=[","]) + "\n" and "new tokens" in r.stderr


def test_generate_chat_mode_and_stdin(llm: camelid.LLM) -> None:
    r = run_cli("generate", "--chat", "-", "-n", "30", "--quiet", stdin="What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    expected = llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=30)
    assert r.stdout == expected + "\n"


def test_generate_quantize_modes(llm: camelid.LLM) -> None:
    """The default (fp32: fused weights, the C++ decode step) and the plain model print the same greedy text;
    int8 runs through the same command; a bad mode is one line."""
    prompt = "The capital of France is"
    expected = llm.generate(prompt, max_new_tokens=8) + "\n"
    for mode in ("none", "fp32"):
        r = run_cli("generate", prompt, "-n", "8", "-q", "--quantize", mode)
        assert r.returncode == 0 and r.stdout == expected, (mode, r.stdout, r.stderr)
    r = run_cli("generate", prompt, "-n", "8", "--quantize", "int8")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stdout + r.stderr
    assert "(134.5M parameters)" in r.stderr  # the model's count, not its packed tensors'
    r = run_cli("generate", prompt, "--quantize", "int3")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "choose one of none, fp32, fp16, int8, int4" in r.stderr


def test_generate_errors_are_one_line() -> None:
    r = run_cli("generate", "hi", "-m", "no-such-model")
    assert r.returncode == 1
    assert r.stderr.startswith("error: no-such-model") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr
    r = run_cli("generate", "word " * 9000, "-n", "4", "-q")
    assert r.returncode == 1 and "context window of 8192" in r.stderr and "Traceback" not in r.stderr


def test_generate_system_prompt_goes_with_chat(llm: camelid.LLM) -> None:
    system, question = "Answer in one word.", "What is the capital of France?"
    r = run_cli("generate", "--chat", "--system", system, question, "-n", "12", "-q")
    assert r.returncode == 0, r.stderr
    want = llm.chat([{"role": "system", "content": system}, {"role": "user", "content": question}], max_new_tokens=12)
    assert r.stdout == want + "\n"


def test_requests_that_cannot_work_are_refused_before_the_model_loads(monkeypatch, capsys) -> None:
    """Each is one line on stderr (the console script's `error: ...`), said before any loading."""
    from camelid.cli import main

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the request was refused")

    monkeypatch.setattr(camelid, "load", no_loading)
    cases = [
        (["generate", "Hi", "--system", "Be brief."], "", "--system is the system prompt of a chat; add --chat"),
        (["generate", ""], "", "the prompt is empty"),
        (["generate", "-"], "  \n", "the prompt is empty"),
        (["generate", "hi", "-m", "smollm2-135m"], "", "did you mean 'smollm2-135m-instruct'?"),
        (["chat", "-m", "SmolLM2"], "", "did you mean 'smollm2-135m-instruct'?"),
        (["generate", "hi", "-m", "llama3-tokenizer"], "", "is a tokenizer, not a model"),
        (["generate", "hi", "-m", "smollm"], "",
         "known models: smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct (`camelid list`)"),
    ]
    for args, stdin, message in cases:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 1, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
    # a misspelt model's suggestions are the models generate runs, not a BERT or tokenizers
    assert "all-minilm" not in err and "llama3-tokenizer" not in err


@pytest.mark.skipif(os.environ.get("CAMELID_NO_KERNELS") == "1", reason="kernels switched off")
def test_a_first_run_says_the_kernels_are_building_and_answers_meanwhile(tmp_path, llm: camelid.LLM) -> None:
    """An empty kernel cache (a fresh machine): the run starts the build in the background, says so on stderr
    (not a terminal here) before anything slow, and answers through PyTorch without waiting for it. The compiler
    here fails at once, so the background build ends by itself."""
    fake = tmp_path / "bin" / "c++"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'fake compiler: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    cache = tmp_path / "kernels"
    r = run_cli("generate", "The capital of France is", "-n", "8",
                env={"CAMELID_KERNEL_CACHE": str(cache), "CXX": str(fake), "CAMELID_NO_KERNELS": ""})
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    lines = r.stderr.splitlines()
    assert "C++ kernels are being built in the background" in lines[0], r.stderr
    assert "this run uses the PyTorch path" in lines[0] and lines[1].startswith("camelid: loading"), r.stderr
    deadline = time.monotonic() + 300  # let the detached builder finish before the folder goes
    while not any(cache.glob("*/failed")) and time.monotonic() < deadline:
        time.sleep(1)


def test_list_and_pull() -> None:
    r = run_cli("list")
    assert r.returncode == 0 and "smollm2-135m-instruct" in r.stdout
    r = run_cli("pull", "smollm2-135m-instruct")
    assert r.returncode == 0 and r.stdout.strip().endswith(".gguf")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_chat_in_a_real_terminal(tmp_path) -> None:
    """`camelid chat` in a terminal, driven through tmux on a server of its own (`-L`): a server started by someone
    else would hand the chat that server's environment (another kernel cache, another model cache), so the
    chat gets this process's environment spelled out on its command line."""
    from camelid.ops import native

    kernels_ready = native.load(build=False) is not None
    socket = f"camelid-test-{uuid.uuid4().hex[:8]}"
    session = "chat"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env_words = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items() if k.isidentifier())
    cmd = (f"cd {shlex.quote(os.getcwd())} && env -i {env_words} {shlex.quote(sys.executable)} -m camelid chat "
           "-t 0 -n 40 --system 'You are a concise assistant.'")

    def tmux(*a: str) -> str:
        return subprocess.run(["tmux", "-L", socket, "-f", os.devnull, *a], capture_output=True, text=True,
                              check=True, env=env).stdout

    def screen() -> str:
        return tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", session)

    def wait_for(predicate, timeout: float = 240.0) -> str:
        end = time.time() + timeout
        while time.time() < end:
            text = screen()
            if predicate(text):
                return text
            time.sleep(0.5)
        raise AssertionError(f"timed out; screen was:\n{screen()}")

    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50", cmd + "; echo chat-exited-with=$?; sleep 30")
    try:
        wait_for(lambda s: s.rstrip().endswith(">>>"))
        tmux("send-keys", "-t", session, "What is the capital of France?", "Enter")
        text = wait_for(lambda s: s.count(">>>") >= 2)
        assert "Paris" in text
        tmux("send-keys", "-t", session, "/reset", "Enter")
        wait_for(lambda s: "(conversation cleared)" in s)
        tmux("send-keys", "-t", session, "/nonsense", "Enter")
        wait_for(lambda s: "unknown command '/nonsense'" in s)
        tmux("send-keys", "-t", session, "/quit", "Enter")
        # the chat exits cleanly; the shell then prints its status and sleeps, so the pane stays readable
        text = wait_for(lambda s: "chat-exited-with=" in s, timeout=30)
        assert "chat-exited-with=0" in text and "Traceback" not in text
        if kernels_ready:  # the chat saw this process's kernel cache, not another environment's
            assert "kernels are being built" not in text, text
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)
