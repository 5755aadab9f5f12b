"""camelid.ops.native: the kernels build wherever a compiler exists, the cache is keyed by what the binary depends
on, locks never hang, a first run never waits, and an AVX2-only build is as right as the native one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from camelid import ops
from camelid.ops import native

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_build_wherever_a_cpp_compiler_is_installed() -> None:
    # every kernel test in the suite skips when the kernels are missing; this one makes sure that only happens
    # where they cannot be built (no compiler) or were switched off, never because the build broke
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    switched_off = os.environ.get("CAMELID_NO_KERNELS") == "1"
    assert native.module() is not None or compiler is None or switched_off, (
        f"{compiler} is installed but the kernels did not build: {native.reason()}")


def test_the_cache_folder_is_keyed_by_cpu_isa_sources_and_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAMELID_ISA", raising=False)
    here = native.build_dir()
    assert here == native.build_dir()  # stable
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2", "avx", "avx2", "fma", "f16c", "avx512f"}))
    other_cpu = native.build_dir()
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2", "avx", "avx2", "fma", "f16c"}))
    avx2_cpu = native.build_dir()
    assert len({here, other_cpu, avx2_cpu}) == 3  # a cache built for another CPU is never the one loaded
    monkeypatch.setenv("CAMELID_ISA", "avx2")
    assert native.isa() == "avx2" and native.build_dir().name.startswith("avx2-")
    assert native.build_dir() != avx2_cpu
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert native.build_dir().parent == avx2_cpu.parent and native.build_dir() != avx2_cpu
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"sse2"}))
    assert native.isa() == "native"  # avx2 is not asked of a CPU without it


def _python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout, cwd=ROOT)


# a child that holds the build lock of the cache folder given as argv[1] until killed
HOLD_LOCK = """
import fcntl, os, sys, time
os.makedirs(sys.argv[1], exist_ok=True)
f = open(os.path.join(sys.argv[1], "build.lock"), "a+")
fcntl.flock(f, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None or os.environ.get("CAMELID_NO_KERNELS") == "1",
                    reason="no C++ compiler, or kernels switched off")
def test_a_build_in_another_process_is_waited_for_a_bounded_time_and_said(tmp_path: Path) -> None:
    env = {"CAMELID_KERNEL_CACHE": str(tmp_path), "CAMELID_KERNEL_WAIT": "2"}
    folder = Path(_python("from camelid.ops import native; print(native.build_dir())", env).stdout.strip())
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        waited = _python("from camelid.ops import native; print(native.load(wait=True))", env)
        assert time.monotonic() - t0 < 60 and waited.stdout.strip() == "None", waited.stderr
        assert "waiting for another process to finish building" in waited.stderr
        assert "using the PyTorch path" in waited.stderr and "Traceback" not in waited.stderr
        quick = _python("from camelid.ops import native; print(native.load(wait=False), native.reason())", env)
        assert quick.stdout.startswith("None") and "being built by another process" in quick.stdout
        assert "this run uses the PyTorch path" in quick.stderr and quick.stderr.count("\n") == 1
        quiet = _python("from camelid.ops import native; native.load(wait=False, quiet=True)", env)
        assert quiet.stderr == ""
    finally:
        holder.kill()
        holder.wait()
    # the OS released the dead holder's lock: nobody is building any more
    free = _python("from camelid.ops import native; print(native._building(native.build_dir()))", env)
    assert free.stdout.strip() == "False", free.stderr


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_a_stale_torch_lock_is_removed_and_the_build_is_announced(tmp_path: Path) -> None:
    """A build killed mid-way leaves torch's `lock` file, on which torch would wait forever: holding our own lock,
    the next build removes it, and says on stderr (not a terminal here) that it is building."""
    env = {"CAMELID_KERNEL_CACHE": str(tmp_path), "CAMELID_NO_KERNELS": ""}
    code = """
        import types
        from pathlib import Path
        from torch.utils import cpp_extension
        from camelid.ops import native

        folder = native.build_dir()
        folder.mkdir(parents=True)
        (folder / "lock").write_text("")  # left behind by a killed build

        def fake_load(name, sources, build_directory, **kw):
            assert not (Path(build_directory) / "lock").exists(), "stale lock still there"
            return types.SimpleNamespace(isa=lambda: "fake")

        cpp_extension.load = fake_load
        print(native.load(wait=True) is not None, (folder / "ready").is_file())
    """
    r = _python(code, env)
    assert r.stdout.split() == ["True", "True"], r.stderr
    assert "camelid: building the C++ kernels for this CPU (once, about a minute)..." in r.stderr


def test_a_first_run_starts_the_build_in_the_background_and_does_not_wait(tmp_path: Path) -> None:
    """wait=False returns at once; the detached builder runs on (here with a compiler that always fails, so it
    ends quickly), and its failure is remembered with the reason instead of being retried on every run."""
    fake = tmp_path / "bin" / "failing-c++"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'fake compiler: no' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {"CAMELID_KERNEL_CACHE": str(tmp_path / "cache"), "CXX": str(fake), "CAMELID_NO_KERNELS": ""}
    t0 = time.monotonic()
    r = _python("from camelid.ops import native; print(native.load(wait=False), native.build_dir())", env)
    assert r.stdout.startswith("None") and time.monotonic() - t0 < 30, r.stderr
    assert "being built in the background" in r.stderr and "this run uses the PyTorch path" in r.stderr
    folder = Path(r.stdout.split()[1])
    deadline = time.monotonic() + 300
    while not (folder / "failed").is_file() and time.monotonic() < deadline:
        time.sleep(1)
    assert (folder / "failed").is_file(), (folder / "build.log").read_text()
    again = _python("from camelid.ops import native; print(native.load(wait=True), native.reason())", env)
    assert again.stdout.startswith("None the build for this CPU failed"), again.stdout + again.stderr


def test_switched_off_kernels_say_so_for_every_op() -> None:
    r = _python("""
        from camelid import ops
        for op, choice in ops.implementations().items():
            print(op, '|', choice.impl, '|', choice.reason)
    """, {"CAMELID_NO_KERNELS": "1"})
    rows = [line.split(" | ") for line in r.stdout.splitlines()]
    assert len(rows) == len(ops.implementations()) and r.returncode == 0, r.stderr
    for op, impl, why in rows:
        if op.startswith("GEMM"):  # the fp32 GEMM is a library's (torch's or oneDNN's), kernels or not
            assert impl.startswith("PyTorch") and why, (op, impl, why)
            continue
        assert impl == "PyTorch" and "CAMELID_NO_KERNELS=1" in why, (op, impl, why)


@pytest.mark.skipif(native.module() is None, reason="C++ kernels could not be built here")
def test_every_op_reports_the_cpp_implementation_where_it_runs() -> None:
    table = ops.implementations()
    assert {"rmsnorm", "rope (training)", "attention (training)", "attention (decode)", "swiglu", "linear fp32",
            "linear int8", "linear int4", "head + loss (training)"} <= set(table)
    for op, choice in table.items():
        if not op.startswith("GEMM"):  # the fp32 GEMM is a library's, not one of camelid's kernels
            assert choice.impl == f"C++ {native.label()}", (op, choice)
    assert native.module().isa().startswith("avx2") == ({"avx2", "fma", "f16c"} <= native.cpu_flags())


@pytest.mark.slow
@pytest.mark.skipif(native.module() is None or not {"avx2", "fma", "f16c"} <= native.cpu_flags(),
                    reason="needs the kernels and an AVX2 CPU")
def test_the_avx2_build_passes_the_kernel_tests() -> None:
    """CAMELID_ISA=avx2 builds the AVX2 paths alone (no -march=native), so on an AVX-512 machine too the path
    every x86-64-v3 CPU takes is checked against the references, by the same tests."""
    env = {**os.environ, "CAMELID_ISA": "avx2", "CAMELID_KERNEL_WAIT": "1800"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/ops",
                        "tests/variants/test_decode_step.py", "-k", "not avx2_build and not background and not "
                        "another_process and not stale_torch_lock"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    check = subprocess.run([sys.executable, "-c", "from camelid.ops import native; print(native.module().isa())"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert check.stdout.strip() == "avx2", check.stderr  # the AVX2 paths, without VNNI or AVX-512
