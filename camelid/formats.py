"""What a path is: `detect(path)` is the one place that decides, for the model loader (`camelid.load`), the
tokenizer loader (`Tokenizer.load`) and the CLI. Also the one GGUF reader (`open_gguf`: the `gguf` library's
GGUFReader, with every read checked against the file's size).

    folder with config.json            Format.HF (model_type llama, mistral, qwen2, qwen3, phi3) or Format.BERT (bert)
    folder with params.json            Format.META (+ consolidated.*.pth)
    folder with vision.json            Format.VISION (`camelid vision train`: image encoder + a text model's name)
    folder with model.safetensors + state.pt + meta.json, or a `camelid pretrain` output folder
                                       Format.CHECKPOINT
    folder with tokenizer files only   Format.TOKENIZER_DIR (tokenizer.json, tokenizer.model or vocab.txt)
    file starting with b"GGUF"         Format.GGUF
    .safetensors file from `camelid quantize`  Format.QUANTIZED
    tokenizer files                    Format.TOKENIZER_JSON, TIKTOKEN (Llama 3's tokenizer.model), SENTENCEPIECE,
                                       WORDPIECE_VOCAB (BERT's vocab.txt)
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import os
import struct
import sys
from collections.abc import Iterator
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from camelid.errors import CamelidError

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # config.json model_type values camelid.load reads
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt")  # in the order a folder's are preferred


class Format(str, Enum):
    HF = "hf"  # a Hugging Face LLaMA-family folder
    BERT = "bert"  # a Hugging Face BERT folder
    META = "meta"  # Meta's params.json + consolidated.NN.pth
    GGUF = "gguf"  # a llama.cpp file (a model, or a vocabulary only)
    QUANTIZED = "quantized"  # a safetensors file written by `camelid quantize`
    VISION = "vision"  # an image encoder joined to a named text model (camelid/vision/checkpoint.py)
    CHECKPOINT = "checkpoint"  # a `camelid pretrain` checkpoint (out/checkpoints/step-N) or output folder
    TOKENIZER_DIR = "tokenizer-dir"  # a folder holding tokenizer files and no model
    TOKENIZER_JSON = "tokenizer.json"
    TIKTOKEN = "tiktoken"
    SENTENCEPIECE = "sentencepiece"
    WORDPIECE_VOCAB = "vocab.txt"

    @property
    def is_llama(self) -> bool:
        """A LLaMA-family model `camelid.load` reads."""
        return self in (Format.HF, Format.META, Format.GGUF, Format.QUANTIZED)

    @property
    def is_tokenizer_file(self) -> bool:
        return self in (Format.TOKENIZER_JSON, Format.TIKTOKEN, Format.SENTENCEPIECE, Format.WORDPIECE_VOCAB)


def detect(path: str | os.PathLike) -> Format:
    """What `path` is (see the module docstring), or a one-line CamelidError naming what was expected."""
    path = Path(path)
    if path.is_dir():
        return _detect_dir(path)
    if not path.is_file():
        raise CamelidError(f"{path}: no such file or directory")
    return _detect_file(path)


def _detect_dir(path: Path) -> Format:
    if (path / "checkpoints" / "latest").is_file():  # a run's folder: its config.json is the training config
        return Format.CHECKPOINT
    config = path / "config.json"
    if config.is_file():
        d = read_json_object(config)
        model_type = d.get("model_type", "llama")
        if model_type == "bert":
            return Format.BERT
        if model_type in LLAMA_MODEL_TYPES:
            return Format.HF
        archs = d.get("architectures")
        name = archs[0] if isinstance(archs, list) and archs else model_type
        raise CamelidError(f"{config}: architecture {name!r} is not supported; camelid loads LLaMA-family models "
                           f"(model_type {', '.join(LLAMA_MODEL_TYPES)}) and BERT")
    if (path / "params.json").is_file():
        return Format.META
    if (path / "vision.json").is_file():
        return Format.VISION
    if all((path / f).is_file() for f in ("model.safetensors", "state.pt", "meta.json")):
        return Format.CHECKPOINT
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        return Format.TOKENIZER_DIR
    raise CamelidError(f"{path}: a folder camelid cannot read; expected a Hugging Face model folder (config.json), "
                       "a Meta folder (params.json + consolidated.*.pth), a training checkpoint or a tokenizer folder "
                       f"({', '.join(TOKENIZER_FILES)})")


def _detect_file(path: Path) -> Format:
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] == b"GGUF":
        return Format.GGUF
    if path.suffix == ".gguf":
        raise CamelidError(f"{path}: not a GGUF file (it starts with {head[:4]!r}, not b'GGUF'); check the path")
    if path.suffix == ".safetensors":
        if safetensors_metadata(path).get("camelid_quantize"):
            return Format.QUANTIZED
        raise CamelidError(f"{path}: a safetensors file without camelid's quantisation metadata; pass the folder "
                           "that holds it and its config.json")
    if head.lstrip()[:1] == b"{":
        if path.name == "config.json":
            raise CamelidError(f"{path}: a model's config.json; pass the folder that holds it")
        return Format.TOKENIZER_JSON
    if _looks_like_tiktoken(head):
        return Format.TIKTOKEN
    if path.suffix == ".txt":
        return Format.WORDPIECE_VOCAB
    if path.suffix == ".model" or head[:1] == b"\x0a":  # a SentencePiece ModelProto starts with its pieces (field 1)
        return Format.SENTENCEPIECE
    raise CamelidError(f"{path}: not a file camelid reads; expected a .gguf file, a camelid-quantised "
                       ".safetensors file, or a tokenizer file (tokenizer.json, tokenizer.model, vocab.txt)")


def _looks_like_tiktoken(head: bytes) -> bool:
    lines = head.splitlines()[:8]
    if not lines:
        return False
    try:
        for line in lines[:-1] or lines:  # the last line of the head may be cut short
            token, rank = line.split()
            base64.b64decode(token, validate=True)
            int(rank)
    except (ValueError, TypeError):
        return False
    return True


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, params.json): one-line errors for anything else."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CamelidError(f"{path}: not UTF-8 text; restore the file from the model's source") from None
    except json.JSONDecodeError as e:
        raise CamelidError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); fix or re-download it") from None
    except OSError as e:
        raise CamelidError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not isinstance(value, dict):
        raise CamelidError(f"{path}: holds a JSON {type(value).__name__}, not an object; fix or re-download it")
    return value


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file (a one-line CamelidError if it is not one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise CamelidError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:160]})") from None


# ---------------------------------------------------------------------------------------------------
# GGUF


def gguf_module() -> Any:
    """The `gguf` package with only its reader, constants and quants imported: what reading a file needs. The
    package's own `__init__` also imports its writer, tensor-name tables, vocabulary tools, sentencepiece and
    yaml (3.4 MiB more of a process); it runs the first time a name beyond those is asked for (`gguf.GGUFWriter`),
    so `import gguf` elsewhere still gives the whole package."""
    if "gguf" in sys.modules:
        return sys.modules["gguf"]
    spec = importlib.util.find_spec("gguf")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        import gguf  # an unusual installation: the whole package

        return gguf
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def complete(name: str) -> Any:
        del package.__dict__["__getattr__"]
        loader.exec_module(package)
        return getattr(package, name)

    package.__dict__["__getattr__"] = complete
    sys.modules["gguf"] = package
    try:
        parts = [importlib.import_module(f"gguf.{m}") for m in ("constants", "quants", "gguf_reader")]
    except BaseException:
        del sys.modules["gguf"]
        raise
    for part in parts:
        package.__dict__.update({k: v for k, v in vars(part).items() if not k.startswith("_")})
    return package


@lru_cache(maxsize=1)
def _checked_reader() -> type:
    gguf = gguf_module()  # imported on first use: it takes a while, and most commands never open a GGUF file

    class CheckedReader(gguf.GGUFReader):
        """gguf.GGUFReader with every read checked against the file's size. The stock reader slices its memory
        map, which silently comes back short past the end, so a damaged length makes it parse garbage or loop
        for as many elements as the length claims. Reading from a plain array view of the same memory map also
        avoids numpy.memmap's per-slice cost (the reader slices once per array element)."""

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            plain = self.__dict__.get("plain")
            if plain is None:
                plain = self.__dict__["plain"] = self.data.view(np.ndarray)
            count = int(count)
            end = int(offset) + np.dtype(dtype).itemsize * count
            if end > plain.shape[0]:
                raise ValueError(f"a length at byte {offset} runs past the end of the file ({end} > {plain.shape[0]})")
            arr = plain[offset:end].view(dtype=dtype)
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _build_fields(self, offs: int, count: int) -> int:
            # as the stock reader, except that arrays of scalars or strings become one PackedArray each
            array = gguf.GGUFValueType.ARRAY
            for _ in range(int(count)):
                start = offs
                key_len, key = self._get_str(offs)
                offs += int(key_len.nbytes + key.nbytes)
                raw_type = self._get(offs, np.uint32)
                offs += int(raw_type.nbytes)
                name = str(bytes(key), encoding="utf-8")
                head = [key_len, key, raw_type]
                item = self._get(offs, np.uint32)[0] if raw_type[0] == array else None
                if item is not None and item != array:
                    field, size = self._packed_array(start, name, head, offs)
                else:
                    size, parts, idxs, types = self._get_field_parts(offs, raw_type[0])
                    field = gguf.ReaderField(start, name, head + parts, [i + len(head) for i in idxs], types)
                self._push_field(field, skip_sum=True)
                offs += size
            return offs

        def _packed_array(self, start: int, name: str, head: list, offs: int) -> tuple[Any, int]:
            item_type, count = self._get(offs, np.uint32), self._get(offs + 4, np.uint64)
            kind = gguf.GGUFValueType(item_type[0])
            first = offs + 12
            if kind == gguf.GGUFValueType.STRING:  # each a uint64 length, then its bytes
                plain = self.__dict__.get("plain")
                if plain is None:
                    plain = self.__dict__["plain"] = self.data.view(np.ndarray)
                order = "<" if (sys.byteorder == "little") == (self.byte_order == "I") else ">"
                length = struct.Struct(order + "Q")
                buffer, end = memoryview(plain), plain.shape[0]
                if first + 8 * int(count[0]) > end:  # each string takes at least its 8-byte length
                    raise ValueError(f"{name} claims {count[0]} strings, more than the rest of the file holds")
                starts, lengths = np.empty(int(count[0]), np.int64), np.empty(int(count[0]), np.int64)
                at = first
                for i in range(int(count[0])):
                    if at + 8 > end:
                        raise ValueError(f"string {i} of {name} runs past the end of the file")
                    n = length.unpack_from(buffer, at)[0]
                    if at + 8 + n > end:
                        raise ValueError(f"string {i} of {name} runs past the end of the file ({at + 8 + n} > {end})")
                    starts[i], lengths[i] = at + 8, n
                    at += 8 + n
                values: Any = (plain, starts, lengths)
                size = at - offs
            else:
                values = self._get(first, self.gguf_scalar_to_np[kind], count[0])
                size = 12 + int(values.nbytes)
            parts = [*head, item_type, count]
            return PackedArray(start, name, parts, [], [gguf.GGUFValueType.ARRAY, kind], values), size

    class PackedArray(gguf.ReaderField):
        """A metadata array kept whole: the values' numpy view, or (for strings) their offsets into the file's
        memory map, instead of the stock reader's numpy views per element (a 150k-token vocabulary's are ~70 MiB
        of small objects, which also leave the heap fragmented). `contents()` gives the same values."""

        values: Any = None

        def __new__(cls, offset: int, name: str, parts: list, data: list, types: list, values: Any) -> PackedArray:
            field = super().__new__(cls, offset, name, parts, data, types)
            field.__dict__["values"] = values
            return field

        def strings(self, errors: str = "strict") -> list[str]:
            return list(self.iter_strings(errors))

        def iter_strings(self, errors: str = "strict") -> Iterator[str]:
            plain, starts, lengths = self.values
            buffer = memoryview(plain)
            for a, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                yield str(buffer[a:a + n], "utf-8", errors)

        def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
            values = self.strings() if self.types[-1] == gguf.GGUFValueType.STRING else self.values.tolist()
            return values[index_or_slice]

    return CheckedReader


def open_gguf(path: str | os.PathLike) -> Any:
    """A GGUF file's metadata and tensor index (`gguf.GGUFReader`; tensors stay in the memory map)."""
    path = Path(path)
    if not path.is_file():
        raise CamelidError(f"{path}: no such GGUF file; check the path")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CamelidError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); check the path")
    try:
        return _checked_reader()(path)
    except (ValueError, IndexError, KeyError, OverflowError, MemoryError) as e:
        detail = " ".join(str(e).split())[:200]
        raise CamelidError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {detail}); "
                           "re-download or re-convert it") from None


def gguf_value(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as a plain Python value (arrays as lists), or `default` when the key is absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        value = field.contents()
    except UnicodeDecodeError:
        raise CamelidError(f"GGUF metadata {key}: not UTF-8 text; the file is damaged, re-download it") from None
    return value.item() if isinstance(value, np.generic) else value
