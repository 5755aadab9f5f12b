"""The one place that builds and loads camelid's C++ kernels (camelid/ops/csrc), for the CPU at hand.

The extension is compiled by PyTorch's JIT mechanism into a cache folder keyed by everything the binary depends
on: the sources, the compiler flags, the instruction-set level, this CPU's feature flags, the torch version and
the Python ABI. A cache built on another CPU is therefore never loaded (no illegal instruction on a CPU without
the instructions it was built for), and a changed source or torch rebuilds.

Instruction-set levels: `native` (-march=native: everything this CPU has, AVX-512/VNNI included) is the
default; `avx2` (-mavx2 -mfma -mf16c) builds the AVX2 paths alone, so they can be tested on an AVX-512
machine. `CAMELID_ISA=avx2|native` picks one; `CAMELID_NO_KERNELS=1` disables the kernels (pure PyTorch).

Building takes about a minute, once per machine. `load(wait=True)` (tests, benchmarks, training) builds in this
process and says so on stderr; `load(wait=False)` (`camelid generate` / `chat`) starts the build in a detached
background process (`python -m camelid.ops.native`) and returns None at once, so that run uses the PyTorch path.
Concurrent builds are serialised by an fcntl lock on a file of our own, which the OS releases when its holder
dies; a process that finds another one building waits at most CAMELID_KERNEL_WAIT seconds (default 600), then
uses the PyTorch path. Every op module asks `module()` for the loaded extension and falls back by itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO

import torch

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialised (one process at a time, please)
    fcntl = None  # type: ignore[assignment]

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("module.cpp", "linear.cpp", "rmsnorm.cpp", "rope.cpp", "swiglu.cpp", "attention.cpp", "head_loss.cpp",
           "decode_step.cpp")
COMMON_FLAGS = ["-O3", "-ffast-math", "-fopenmp"]
ISA_FLAGS = {"avx2": ["-mavx2", "-mfma", "-mf16c"], "native": ["-march=native"]}
AVX2_NEEDS = {"avx2", "fma", "f16c"}
# the /proc/cpuinfo flags a compiler targets (others, like bug flags or "hypervisor", vary between VMs of one CPU)
_RELEVANT = re.compile(r"^(sse|ssse|avx|fma|f16c|bmi|amx|abm|popcnt|movbe|adx|sha|aes|vaes|vpclmul|gfni|lzcnt"
                       r"|xsave|asimd|sve|fp16|bf16|i8mm|dotprod)")
NAME = "camelid_kernels"

_module: ModuleType | None = None
_tried = False
_reason = "the C++ kernels are not loaded yet"


@dataclass(frozen=True)
class Choice:
    """Which implementation of an op runs, and why: `camelid info --kernels` prints one per op."""

    impl: str  # "C++ <isa>" or "PyTorch"
    reason: str

    def __str__(self) -> str:
        return f"{self.impl} ({self.reason})"


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (x86 `flags` / Arm `Features` in /proc/cpuinfo; empty where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(m.group(1).split()) if m else frozenset()


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for benchmark and evaluation reports; the platform's word elsewhere."""
    try:
        m = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        m = None
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


def isa() -> str:
    """The instruction-set level to build: CAMELID_ISA if set (and runnable here), else native."""
    wanted = os.environ.get("CAMELID_ISA", "native")
    if wanted == "avx2" and AVX2_NEEDS <= cpu_flags():
        return "avx2"
    return "native"


def target() -> str:
    """What a build at `isa()` is compiled for, in words: avx2, or the CPU's best (avx512-vnni, avx512, ...)."""
    flags = cpu_flags()
    if isa() == "avx2":
        return "avx2"
    if "avx512f" in flags:
        return "avx512-vnni" if {"avx512_vnni", "avx512vl"} <= flags or "avx_vnni" in flags else "avx512"
    if AVX2_NEEDS <= flags:
        return "avx2-vnni" if "avx_vnni" in flags else "avx2"
    return platform.machine() or "generic"


def label() -> str:
    """The hand-written instruction paths of the loaded build (e.g. avx2+vnni; `target()` before it is loaded)."""
    return _module.isa() if _module is not None else target()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def build_dir() -> Path:
    """The cache folder for this CPU, ISA level, source tree, torch and Python."""
    base = Path(os.environ.get("CAMELID_KERNEL_CACHE", Path.home() / ".cache" / "camelid" / "kernels"))
    level = isa()
    h = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.suffix in (".cpp", ".h"):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    compiler = _compiler() or ""
    stamp = os.stat(compiler) if compiler else None
    features = sorted(f for f in cpu_flags() if _RELEVANT.match(f))
    for part in (COMMON_FLAGS, ISA_FLAGS[level], level, features, torch.backends.cpu.get_cpu_capability(),
                 torch.__version__, sys.implementation.cache_tag, sysconfig.get_config_var("EXT_SUFFIX"),
                 platform.machine(), compiler, stamp and (stamp.st_size, stamp.st_mtime_ns)):
        h.update(repr(part).encode() + b"\0")
    return base / f"{level}-{h.hexdigest()[:16]}"


def reason() -> str:
    """Why the kernels are not loaded in this process (meaningful when `module()` is None)."""
    return _reason


def loaded() -> ModuleType | None:
    """The extension if this process has loaded it (never builds or loads: safe while torch.compile traces)."""
    return _module


def module() -> ModuleType | None:
    """The loaded extension, building it on first use (load(wait=True)), or None: then use PyTorch."""
    return _module if _tried else load()


def load(wait: bool = True, quiet: bool = False, build: bool = True) -> ModuleType | None:
    """Load the kernels for this CPU, building them if needed; None where they cannot be had (see `reason()`).

    wait=False: never build here; start a background build if none is running and return None at once
    (one stderr line unless `quiet`). build=False: only load a finished build. Decided once per process."""
    global _module, _tried, _reason
    if _tried:
        return _module
    _tried = True
    if os.environ.get("CAMELID_NO_KERNELS") == "1":
        _reason = "CAMELID_NO_KERNELS=1"
        return None
    if _compiler() is None:
        _reason = f"no C++ compiler ({os.environ.get('CXX', 'c++')} not found; install g++ for the fast path)"
        return None
    folder = build_dir()
    if (folder / "ready").is_file():  # loaded as it is: torch's builder (setuptools, ~6 MiB of modules) not imported
        return _import(folder)
    if (folder / "failed").is_file():
        _reason = f"the build for this CPU failed ({(folder / 'failed').read_text().strip()}); delete {folder} to retry"
        return None
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        _reason = "ninja is not installed (pip install ninja)"
        return None
    if not build:
        _reason = ("the C++ kernels are being built (another process)" if _building(folder) else
                   "the C++ kernels are not built yet for this CPU (the first command that needs them builds them)")
        return None
    if not wait:
        if _building(folder):
            _reason = "the C++ kernels are being built by another process"
        else:
            _start_background_build(folder)
            _reason = "the C++ kernels are being built in the background"
        if not quiet:
            print(f"camelid: {_reason} (once, about a minute); this run uses the PyTorch path",
                  file=sys.stderr, flush=True)
        return None
    return _build(folder)


def status() -> Choice:
    """The kernels' state on this machine, for `camelid info --kernels` (loads a finished build, never builds)."""
    mod = load(build=False)
    if mod is None:
        return Choice("PyTorch", reason())
    flags = " ".join(ISA_FLAGS[isa()])
    return Choice(f"C++ {label()}", f"built for this CPU ({flags}: {target()}) in {build_dir()}")


def _import(folder: Path) -> ModuleType | None:
    global _module, _reason
    path = folder / f"{NAME}_{isa()}.so"
    try:
        spec = importlib.util.spec_from_file_location(f"{NAME}_{isa()}", path)
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
    except Exception as e:  # noqa: BLE001 - a damaged cache: rebuild rather than fail
        (folder / "ready").unlink(missing_ok=True)
        _reason = f"the cached build in {folder} does not load ({type(e).__name__}); it is rebuilt on next use"
        return None
    _module = mod
    return mod


def _building(folder: Path) -> bool:
    """Whether another process holds the build lock right now."""
    if fcntl is None or not folder.is_dir():
        return False
    with open(folder / "build.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def _locked(folder: Path, timeout: float) -> Iterator[bool]:
    """Hold the build lock (True), or give up after `timeout` seconds of another process holding it (False)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "build.lock", "a+") as f:
        if fcntl is None:
            yield True
            return
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    yield False
                    return
                if not told:
                    print(f"camelid: waiting for another process to finish building the C++ kernels (up to "
                          f"{timeout:.0f}s)...", file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.5)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(folder: Path) -> ModuleType | None:
    global _module, _reason
    timeout = float(os.environ.get("CAMELID_KERNEL_WAIT", "600"))
    with _locked(folder, timeout) as held:
        if not held:
            _reason = f"another process has been building the C++ kernels for over {timeout:.0f}s"
            print(f"camelid: {_reason}; using the PyTorch path", file=sys.stderr, flush=True)
            return None
        if (folder / "ready").is_file():  # the process we waited for finished the build
            return _import(folder)
        # torch's own lock file is ours to remove: every build into this folder holds our lock first, so one
        # left behind belongs to a build that was killed (torch would wait on it forever)
        (folder / "lock").unlink(missing_ok=True)
        print("camelid: building the C++ kernels for this CPU (once, about a minute)...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            from torch.utils import cpp_extension

            mod = cpp_extension.load(name=f"{NAME}_{isa()}", sources=[str(CSRC / s) for s in SOURCES],
                                     extra_cflags=COMMON_FLAGS + ISA_FLAGS[isa()], extra_ldflags=["-fopenmp"],
                                     build_directory=str(folder), verbose=False)
        except Exception as e:  # noqa: BLE001 - any build problem means: use the PyTorch path
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            (folder / "failed").write_text(f"{type(e).__name__}: {first}\n")
            _reason = f"the build for this CPU failed ({type(e).__name__}: {first}); delete {folder} to retry"
            print(f"camelid: C++ kernels unavailable: {_reason}; using the PyTorch path", file=sys.stderr, flush=True)
            return None
        (folder / "ready").write_text(f"built in {time.perf_counter() - t0:.0f}s\n")
        print(f"camelid: C++ kernels built in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        _module = mod
        return mod


def _start_background_build(folder: Path) -> None:
    """`python -m camelid.ops.native` in its own session (it outlives this process), its output in build.log."""
    folder.mkdir(parents=True, exist_ok=True)
    # half the cores for the compiler: the run that started the build answers on the others meanwhile
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(max(1, (os.cpu_count() or 2) // 2)))}
    log: IO[bytes]
    with open(folder / "build.log", "ab") as log:
        subprocess.Popen([sys.executable, "-m", "camelid.ops.native"], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log, start_new_session=True, close_fds=True, env=env)


def main() -> None:
    """Build (or find) the kernels for this CPU; exit status 0 when they load."""
    os.environ.setdefault("CAMELID_KERNEL_WAIT", "3600")
    mod = load(wait=True)
    print(f"camelid kernels: {status() if mod is not None else reason()}", file=sys.stderr)
    sys.exit(0 if mod is not None else 1)


if __name__ == "__main__":
    main()
