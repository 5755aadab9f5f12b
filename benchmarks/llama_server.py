"""Build llama.cpp's `llama-server` once, from the llama.cpp sources that the llama-cpp-python sdist vendors.

    python benchmarks/llama_server.py [--version 0.3.36] [--cache DIR] [--jobs 1]   # prints the binary's path

The binary lands in DIR/llama-cpp-python-VERSION/build/bin/llama-server (DIR defaults to
$CAMELID_LLAMA_SERVER_CACHE, else ~/.cache/camelid/llama-server); a second call finds it and returns at once, so a
CI job can cache DIR. The version defaults to the installed llama-cpp-python's, so both llama.cpp servers in
benchmarks/serve.py run the same llama.cpp. Release build, GGML_NATIVE=ON (this CPU's instruction set), no
OpenSSL, no prebuilt web UI; only the `llama-server` target. Needs cmake and a C++ compiler; takes a while on
2 cores (use --jobs 1 on a shared machine).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tarfile
from pathlib import Path


def default_cache() -> Path:
    return Path(os.environ.get("CAMELID_LLAMA_SERVER_CACHE", Path.home() / ".cache" / "camelid" / "llama-server"))


def installed_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return "0.3.36"


def binary_path(version: str, cache: Path) -> Path:
    return cache / f"llama-cpp-python-{version}" / "build" / "bin" / "llama-server"


def build(version: str | None = None, cache: Path | None = None, jobs: int = 1) -> Path:
    """The path of a built `llama-server` for llama-cpp-python `version`, building it when it is not cached."""
    version = version or installed_version()
    cache = cache or default_cache()
    binary = binary_path(version, cache)
    if binary.is_file():
        return binary
    root = cache / f"llama-cpp-python-{version}"
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(root)], check=True)
    source = root / f"llama_cpp_python-{version}"
    if not source.is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(root, filter="data")
    llama_cpp = source / "vendor" / "llama.cpp"
    build_dir = root / "build"
    subprocess.run(["cmake", "-S", str(llama_cpp), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)], check=True)
    if not binary.is_file():
        raise SystemExit(f"the build finished but {binary} is missing")
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default=None, help="llama-cpp-python version (default: the installed one)")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    print(build(args.version, args.cache, args.jobs))


if __name__ == "__main__":
    main()
