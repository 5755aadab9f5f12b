"""The process in which test_fuzz_readers.py reads damaged files: camelid is imported first, then the address
space is capped (RLIMIT_AS: what it uses now plus HEADROOM), so a reader that believes a huge length and allocates
for it fails here with a MemoryError, which the test counts as a failure, instead of taking the machine's memory.

One JSON request per line on stdin: {"reader": "gguf" | "hf" | "allocate", "path": ...}; one JSON answer per line
on stdout: {"outcome": "loaded" | "error" | "other", "detail": ...}. "error" is a CamelidError (its message has to
be one line); "other" is any other exception, MemoryError included."""

from __future__ import annotations

import json
import resource
import sys
import traceback

HEADROOM = 1 << 30


def read(reader: str, path: str) -> dict:
    import torch

    import camelid
    from camelid.errors import CamelidError

    try:
        if reader == "allocate":  # the test of the cap itself: `path` is a number of bytes
            return {"outcome": "loaded", "detail": str(len(bytearray(int(path))))}
        llm = camelid.load(path)
        vocab = llm.config.vocab_size
        with torch.no_grad():  # the model it built runs: a config the reader accepted is one the model can use
            llm.model(torch.tensor([[0, min(1, vocab - 1), vocab - 1]]))
        if llm.tokenizer is not None:
            llm.tokenizer.decode(llm.tokenizer.encode("hello world"))
        return {"outcome": "loaded", "detail": type(llm.model).__name__}
    except CamelidError as e:
        return {"outcome": "error", "detail": str(e)}
    except BaseException as e:  # noqa: BLE001 - whatever it is, the test reports it
        tail = traceback.format_exception(type(e), e, e.__traceback__)[-3:]
        return {"outcome": "other", "detail": f"{type(e).__name__}: {e}"[:500] + " | " + "".join(tail)[-1500:]}


def main() -> None:
    import torch

    import camelid  # noqa: F401 - everything a reader needs, imported before the cap
    import camelid.interop.gguf  # noqa: F401
    import camelid.interop.hf  # noqa: F401
    from camelid.formats import open_gguf  # noqa: F401

    torch.set_num_threads(1)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print(json.dumps({"ready": vm + HEADROOM}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(read(request["reader"], request["path"])), flush=True)


if __name__ == "__main__":
    main()
