"""`camelid generate` in scripts and `camelid chat` in a real terminal (tmux), on the default model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

import camelid


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "camelid", *args], input=stdin, capture_output=True, text=True,
                          timeout=600)


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
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "choose one of none, fp32, int8, int4" in r.stderr


def test_generate_errors_are_one_line() -> None:
    r = run_cli("generate", "hi", "-m", "no-such-model")
    assert r.returncode == 1
    assert r.stderr.startswith("error: no-such-model") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr
    r = run_cli("generate", "word " * 9000, "-n", "4", "-q")
    assert r.returncode == 1 and "context window of 8192" in r.stderr and "Traceback" not in r.stderr


def test_list_and_pull() -> None:
    r = run_cli("list")
    assert r.returncode == 0 and "smollm2-135m-instruct" in r.stdout
    r = run_cli("pull", "smollm2-135m-instruct")
    assert r.returncode == 0 and r.stdout.strip().endswith(".gguf")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_chat_in_a_real_terminal(tmp_path) -> None:
    session = f"camelid-{uuid.uuid4().hex[:8]}"
    env_prefix = f"cd {os.getcwd()} && PYTHONPATH={os.pathsep.join(sys.path)!r} "
    cmd = env_prefix + f"{sys.executable} -m camelid chat -t 0 -n 40 --system 'You are a concise assistant.'"

    def tmux(*a: str) -> str:
        return subprocess.run(["tmux", *a], capture_output=True, text=True, check=True).stdout

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
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
