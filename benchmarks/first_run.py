"""The README's main job on a fresh machine, timed: a clean clone, a fresh virtual environment, empty caches.

    python benchmarks/first_run.py            # clones this repository's HEAD into a temporary folder

It runs the README's "Install and run" block as written: the setup lines (venv, pip) first, timed apart,
then `camelid generate ...` with CAMELID_CACHE and CAMELID_KERNEL_CACHE set to empty folders, so the model
is fetched with pip and the C++ kernels start building in the background. Every line the command prints is
shown with the second it appeared, so a silent wait shows as a gap. Then it waits for the background build,
and runs the command once more (the kernels loaded, the model cached). Numbers depend on the machine and on
what else runs on it: the CPU and the load average are printed with them.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = re.compile(r"^\s*(python3? -m venv |\. \.venv/bin/activate|pip install )")


def main_job() -> list[str]:
    """The README's first bash block (the main job), one command per line."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert m, "README.md has no bash block"
    return [line.split("   #")[0].strip() for line in m.group(1).splitlines() if line.strip()]


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^model name\s*:\s*(.*)$", info, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.*)$", info, re.MULTILINE)
    simd = sorted(f for f in (flags.group(1).split() if flags else []) if f.startswith(("avx", "amx")))
    return f"{name.group(1) if name else 'unknown CPU'}, {os.cpu_count()} cores; {' '.join(simd)}"


def timed(script: str, cwd: Path, env: dict[str, str]) -> tuple[float, list[tuple[float, str, str]], int]:
    """Run `script` under bash; (wall seconds, [(second, stream, line)], exit status). The pipes are read
    unbuffered, so each line carries the second it was written."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    sel = selectors.DefaultSelector()
    pending = {}
    for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        sel.register(pipe.fileno(), selectors.EVENT_READ, name)  # type: ignore[union-attr]
        pending[name] = b""
    lines: list[tuple[float, str, str]] = []
    while sel.get_map():
        for key, _ in sel.select():
            chunk = os.read(key.fd, 1 << 16)
            now = time.perf_counter() - t0
            if not chunk:
                sel.unregister(key.fd)
                chunk = b"\n" if pending[key.data] else b""
            *complete, pending[key.data] = (pending[key.data] + chunk).split(b"\n")
            lines += [(now, key.data, line.decode(errors="replace")) for line in complete]
    status = proc.wait()
    return time.perf_counter() - t0, lines, status


def show(title: str, wall: float, lines: list[tuple[float, str, str]], status: int) -> None:
    print(f"\n{title}: {wall:.1f} s, exit status {status}")
    for t, stream, line in lines:
        print(f"  {t:6.1f}s {stream}: {line[:150]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    parser.add_argument("--build-wait", type=float, default=900, help="seconds to wait for the kernel build")
    args = parser.parse_args()

    commands = main_job()
    setup = [c for c in commands if SETUP.match(c)]
    job = " && ".join(c for c in commands if not SETUP.match(c))
    tmp = Path(tempfile.mkdtemp(prefix="camelid-first-run-"))
    clone, caches = tmp / "camelid", {"CAMELID_CACHE": str(tmp / "cache"), "CAMELID_KERNEL_CACHE": str(tmp / "kernels")}
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CAMELID_CACHE", "CAMELID_KERNEL_CACHE",
                                                             "CAMELID_NO_KERNELS", "PYTHONPATH")}
    try:  # an index out of reach (a machine with the wheels on local disk): no retries for every package
        socket.getaddrinfo("download.pytorch.org", 443)
    except OSError:
        env["PIP_RETRIES"] = "0"
    print(f"CPU: {cpu()}")
    print(f"load average before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(f"the main job: {job}")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", head.strip()], cwd=clone, check=True)
    print(f"a clean clone of {head.strip()[:12]} in {clone}")
    wall, lines, status = timed("set -e\n" + "\n".join(setup) + "\n", clone, env)
    print(f"\nsetup ({' ; '.join(setup)}): {wall:.1f} s, exit status {status}")
    if status:
        show("setup", wall, lines[-20:], status)
        sys.exit(1)
    activate = ". .venv/bin/activate && "
    wall, lines, status = timed(activate + job, clone, {**env, **caches})
    show("first run (empty model and kernel caches)", wall, lines, status)
    first_line = lines[0][0] if lines else wall
    print(f"  first line after {first_line:.1f} s; answered after {wall:.1f} s")

    deadline = time.monotonic() + args.build_wait
    kernels = Path(caches["CAMELID_KERNEL_CACHE"])
    while time.monotonic() < deadline and not any(kernels.glob("*/ready")) and not any(kernels.glob("*/failed")):
        time.sleep(2)
    for f in [*kernels.glob("*/ready"), *kernels.glob("*/failed")]:
        print(f"\nbackground kernel build: {f.name}: {f.read_text().strip()}")
    wall, lines, status = timed(activate + job, clone, {**env, **caches})
    show("second run (model cached, kernels built)", wall, lines, status)
    print(f"load average after: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
