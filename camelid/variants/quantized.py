"""Weight-only quantisation for inference, applied from outside the reference model: int8 (one scale per output
row), int4 (groups of 32 with an fp16 scale and minimum, like llama.cpp's Q4_1) and fp16 (16-bit weights, fp32
arithmetic: half of fp32's bytes to stream per token). Activations stay fp32
(except in the one-call decode step, camelid.variants.decode_step, which by default multiplies int8/int4 weights
with int8 activations).

Decode (1-8 rows of activations) goes through camelid's C++ GEMV kernels (camelid.ops.linear), which stream the
packed weights; PyTorch's `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` were measured 5-25x slower than an
fp32 GEMV on this class of CPU, so they are not used. Prompts (many rows) dequantise the layer and use torch's
GEMM. `quantize_model` first fuses the model (camelid.variants.fused); mode "fp32" does only that and puts the
fp32 weights behind the same GEMV kernels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from camelid import heap, hugepages
from camelid.config import LlamaConfig
from camelid.errors import CamelidError
from camelid.model import Llama, rope_inv_freq
from camelid.ops import linear, native
from camelid.variants.fused import fuse

MODES = ("int8", "int4", "fp16")  # the modes `save_quantized` writes
GROUP = linear.GROUP


class Int8Linear(nn.Module):
    """y = x W^T with W as int8 codes `qweight` [N, K] times one fp32 `scale` per row."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        if weight.is_meta:  # a layout to load into (load_stored, load_quantized): shapes only
            qweight, scale = weight.new_empty(weight.shape, dtype=torch.int8), weight.new_empty(weight.shape[0])
        else:
            qweight, scale = linear.quantize_int8(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.out_features, self.in_features = weight.shape

    def dequantize(self) -> Tensor:
        return linear.dequantize("int8", self.qweight, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        return linear.linear(x, "int8", self.qweight, self.scale)


class Int4Linear(nn.Module):
    """y = x W^T with W as packed 4-bit codes `qweight` [N, K/2] and an fp16 `scale` and `minimum` per group of 32."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        n, k = weight.shape
        if weight.is_meta and k % GROUP == 0:  # a layout to load into: shapes only
            qweight = weight.new_empty(n, k // 2, dtype=torch.uint8)
            scale, minimum = (weight.new_empty(n, k // GROUP, dtype=torch.float16) for _ in range(2))
        else:
            qweight, scale, minimum = linear.quantize_int4(weight)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", minimum)
        self.out_features, self.in_features = weight.shape

    def dequantize(self) -> Tensor:
        return linear.dequantize("int4", self.qweight, self.scale, self.minimum)

    def forward(self, x: Tensor) -> Tensor:
        return linear.linear(x, "int4", self.qweight, self.scale, self.minimum)


class _TableEmbedding(nn.Module):
    """An embedding whose rows are a linear layer's matrix (`TABLE`'s format): a tied head's own module, or one of
    its own."""

    TABLE: type[nn.Module]

    def __init__(self, weight: Tensor | None = None, shared: nn.Module | None = None) -> None:
        super().__init__()
        if shared is not None:
            self.__dict__["table"] = shared  # not registered: its tensors are saved once, under output.*
        else:
            self.table = self.TABLE(weight)

    def dequantize(self) -> Tensor:
        return self.table.dequantize()


class Int8Embedding(_TableEmbedding):
    """Embedding rows as int8 with one scale per row: Int8Linear's format, so a tied int8 output head and the
    embedding share one matrix (for SmolLM2 that saves the 113 MB fp32 table)."""

    TABLE = Int8Linear

    def forward(self, ids: Tensor) -> Tensor:
        t = self.table
        return t.qweight[ids].float() * t.scale[ids].unsqueeze(-1)


class Fp16Linear(nn.Module):
    """y = x W^T with W stored in fp16 and every product computed in fp32 (each weight converted as it is read)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        if weight.is_meta:  # a layout to load into: shapes only
            w = weight.new_empty(weight.shape, dtype=torch.float16)
        else:
            w = weight.detach().to(torch.float16).contiguous()
        self.register_buffer("weight", w)
        self.out_features, self.in_features = weight.shape

    def dequantize(self) -> Tensor:
        return linear.dequantize("f16", self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return linear.linear(x, "f16", self.weight)


class Fp16Embedding(_TableEmbedding):
    """Embedding rows in fp16, read as fp32: Fp16Linear's format, so a tied fp16 head and the embedding share one
    matrix."""

    TABLE = Fp16Linear

    def forward(self, ids: Tensor) -> Tensor:
        return self.table.weight[ids].float()


class FastLinear(nn.Module):
    """fp32 linear whose few-row products use camelid's streaming GEMV (torch's GEMM otherwise)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: Tensor) -> Tensor:
        return linear.linear(x, "f32", self.weight)


LINEARS = {"int8": Int8Linear, "int4": Int4Linear, "fp16": Fp16Linear, "fp32": FastLinear}


def _linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    return [(f"{pname}.{name}".lstrip("."), parent, name, child) for pname, parent in model.named_modules()
            for name, child in parent.named_children() if isinstance(child, nn.Linear) and child.bias is None]


@torch.no_grad()
def quantize_model(model: Llama, mode: str, head: str | None = None, huge_pages: bool = True) -> Llama:
    """Fuse `model` (camelid.variants.fused.fuse), then replace every bias-free nn.Linear in place, one at a
    time, by its weight-only quantised twin ("int8", "int4"), its 16-bit twin ("fp16": fp16 weights, fp32
    arithmetic) or the fp32 fast-GEMV linear ("fp32"); each fp32 weight is freed as soon as it is replaced, so
    peak memory is the fp32 model plus one layer. In int8/int4 mode the embedding becomes int8 too (sharing the
    head's matrix when they are tied and the head is int8), in fp16 mode fp16 (likewise). The
    output head uses `head` (default: int8 in int4 mode, because the head's error shows directly in every logit;
    else `mode`). In int4 mode a layer whose input width is not a multiple of 32 is quantised to int8.
    huge_pages: in fp32 and fp16 mode, move the weights into transparent huge pages where the kernel allows
    (camelid.hugepages: the memory-bound fp32 decode step streams them faster; the int8/int4 steps gained ~1%)."""
    if mode not in LINEARS:
        raise CamelidError(f"unknown quantize mode {mode!r}; choose one of int8, int4, fp16, fp32")
    head = head or ("int8" if mode == "int4" else mode)
    if head not in LINEARS:
        raise CamelidError(f"unknown head mode {head!r}; choose one of int8, int4, fp16, fp32")
    native.module()  # build (or find) the kernels now, not inside the first (possibly compiled) forward
    fuse(model)  # fewer, larger GEMVs: QKV and gate+up read x once
    for path, parent, name, lin in _linears(model):
        kind = LINEARS[head if path == "output" else mode]
        if kind is Int4Linear and lin.in_features % GROUP:
            kind = Int8Linear  # groups of 32 do not tile this row; int8 keeps it exact enough
        setattr(parent, name, kind(lin.weight))
    emb = model.tok_embeddings
    if mode == "fp16" and isinstance(emb, nn.Embedding):
        tied = model.config.tie_embeddings and isinstance(model.output, Fp16Linear)
        model.tok_embeddings = Fp16Embedding(shared=model.output) if tied else Fp16Embedding(emb.weight)
    elif mode in MODES and isinstance(emb, nn.Embedding):
        tied = model.config.tie_embeddings and isinstance(model.output, Int8Linear)
        model.tok_embeddings = Int8Embedding(shared=model.output) if tied else Int8Embedding(emb.weight)
    if mode in ("fp32", "fp16") and huge_pages:
        hugepages.move_to_huge_pages(model)
    model.quantized = mode  # type: ignore[assignment]
    return model


class StoredWeight(Protocol):
    """One tensor as a checkpoint stores it, converted on demand (camelid.interop.gguf implements it), so that a
    loader can quantise it in slices of rows, or take it as it is, without an fp32 copy of the whole model."""

    shape: tuple[int, ...]

    def fp32(self, start: int = 0, stop: int | None = None, scratch: bool = False) -> Tensor:
        """Rows [start, stop) as a new fp32 tensor (scratch=True: possibly a buffer the next such call reuses)."""

    def f16(self, start: int = 0, stop: int | None = None) -> Tensor | None:
        """Rows [start, stop) as stored fp16 (possibly a buffer the next read reuses), when the file stores fp16."""

    def mapped(self) -> Tensor | None:
        """The whole fp32 tensor without a copy (a copy-on-write memory map), when the file stores it so."""

    def int4(self, out: tuple[Tensor, Tensor, Tensor]) -> bool:
        """The tensor written into `out` in Int4Linear's format (packed codes, scale, minimum) when that is exact;
        else False (`out` possibly partly written)."""


ROWS_PER_SLICE = 1 << 18  # values converted at a time (1 MiB of fp32)
TRIM_EVERY = 1 << 22  # values converted between two heap.trim() calls


def _destinations(model: Llama, name: str) -> list[tuple[nn.Module, str, int]]:
    """Where the reference model's tensor `name` lives in the fused/quantised model: (module, attribute, first
    row). The fused products hold q/k/v (wqkv) and gate/up (w13) as row blocks; a tied embedding is the head."""
    if name == "tok_embeddings.weight":
        emb = model.tok_embeddings
        found = [(emb.table if isinstance(emb, _TableEmbedding) else emb, "weight", 0)]
        if model.config.tie_embeddings:
            found += _destinations(model, "output.weight")
        return list({id(m): (m, a, r) for m, a, r in found}.values())
    path, attr = name.rsplit(".", 1)
    try:
        return [(model.get_submodule(path), attr, 0)]
    except AttributeError:
        pass
    parent_path, child = path.rsplit(".", 1)
    parent = model.get_submodule(parent_path)
    c = model.config
    blocks = {"wq": ("wqkv", 0), "wk": ("wqkv", c.n_heads * c.head_dim),
              "wv": ("wqkv", (c.n_heads + c.n_kv_heads) * c.head_dim),
              "w1": ("w13", 0), "w3": ("w13", c.intermediate_size)}
    fused, row = blocks[child]
    return [(getattr(parent, fused), attr, row)]


def _materialize(module: nn.Module, attr: str, arena: hugepages.Arena | None = None) -> Tensor:
    """The module's tensor `attr`, allocated (uninitialised) on the CPU the first time it is written: in `arena`
    where given, for matrices."""
    t = getattr(module, attr)
    if t.is_meta:
        new = arena.empty(tuple(t.shape), t.dtype) if arena is not None and t.dim() >= 2 else None
        _assign(module, attr, new if new is not None else torch.empty(t.shape, dtype=t.dtype))
    return getattr(module, attr)


def _assign(module: nn.Module, attr: str, t: Tensor) -> None:
    old = module._parameters.get(attr)
    if old is not None:
        module._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        setattr(module, attr, t)


def _write(module: nn.Module, attr: str, row: int, w: StoredWeight, whole: dict[int, Tensor], mapped: set[int],
           arena: hugepages.Arena | None = None) -> None:
    """Convert `w` into rows [row, row + len(w)) of the module's `attr` (whole: the fp32 tensor once read, so a
    tied embedding and head share it; mapped: the data pointers of tensors taken as memory maps of the file;
    arena: where matrices written in place are allocated)."""
    n = w.shape[0]
    if isinstance(module, Int4Linear) and attr == "weight":
        dest = tuple(_materialize(module, part, arena)[row:row + n] for part in ("qweight", "scale", "minimum"))
        if not w.int4(dest):  # the file's blocks are not int4 as they are: quantise the values
            step = max(1, ROWS_PER_SLICE // w.shape[1])
            for a in range(0, n, step):
                b = min(n, a + step)
                for rows, part in zip(dest, linear.quantize_int4(w.fp32(a, b, scratch=True)), strict=True):
                    rows[a:b] = part
    elif isinstance(module, Int8Linear) and attr == "weight":
        step = max(1, ROWS_PER_SLICE // w.shape[1])
        for a in range(0, n, step):
            b = min(n, a + step)
            qweight, scale = (_materialize(module, part, arena)[row + a:row + b] for part in ("qweight", "scale"))
            linear.quantize_int8_(w.fp32(a, b, scratch=True), qweight, scale)
    elif isinstance(module, Fp16Linear) and attr == "weight":
        step = max(1, ROWS_PER_SLICE // w.shape[1])
        for a in range(0, n, step):
            b = min(n, a + step)
            rows = w.f16(a, b)  # F16 rows as stored; other types through fp32
            if rows is None:
                rows = w.fp32(a, b, scratch=True)
            _materialize(module, "weight", arena)[row + a:row + b] = rows
    elif row == 0 and tuple(getattr(module, attr).shape) == tuple(w.shape):
        if id(w) not in whole:
            t = w.mapped()
            if t is not None:
                mapped.add(t.data_ptr())
            whole[id(w)] = t if t is not None else w.fp32()
        _assign(module, attr, whole[id(w)])
    else:
        _materialize(module, attr, arena)[row:row + n] = w.fp32()


class _MetaWeights(TorchFunctionMode):
    """Build modules with their weights on the meta device (no memory) and no initialisation, while the small
    computations of a constructor (the rotary frequencies) run on the CPU: on meta tensors PyTorch runs some
    ops (normal_, arange, cat) through Python references whose first use imports its compiler stack, about
    70 MiB and seconds that a loader never needs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if name in ("empty", "ones", "zeros") and func is getattr(torch, name) and kwargs.get("device") is None:
            kwargs["device"] = "meta"  # the weights: nn.Linear / nn.Embedding / RMSNorm parameters
        elif name == "normal_":  # torch.nn.init.normal_(tensor=...) or Tensor.normal_: values nobody reads
            t = args[0] if args else kwargs.get("tensor")
            if isinstance(t, Tensor) and t.is_meta:
                return t
        elif name == "cat" and func is torch.cat and all(t.is_meta for t in args[0]):  # fuse's concatenations
            parts, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0)
            shape = list(parts[0].shape)
            shape[dim] = sum(t.shape[dim] for t in parts)
            return torch.empty(shape, dtype=parts[0].dtype, device="meta")
        return func(*args, **kwargs)


def skeleton(config: LlamaConfig, mode: str, head: str | None = None) -> tuple[Llama, dict[str, tuple[int, ...]]]:
    """`quantize_model(Llama(config), mode, head)` on the meta device (no memory, no initialisation), and the
    reference model's tensor shapes by name."""
    with _MetaWeights():
        model = Llama(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        quantize_model(model, mode, head=head)
    return model, expected


@torch.no_grad()
@heap.loading()
def load_stored(config: LlamaConfig, mode: str, weights: Iterable[tuple[str, StoredWeight]], source: str,
                head: str | None = None) -> Llama:
    """`quantize_model(model, mode, head)` of the model whose tensors `weights` streams (under the reference
    model's names), built without the fp32 model: the fused/quantised modules are laid out on the meta device,
    then each stored tensor is converted straight into its place (slices of rows at a time for int8/int4, int4
    codes taken as they are where `int4()` can, fp32 tensors memory-mapped where `mapped()` does).
    Peak memory is the result plus one slice in flight. In fp16 mode the matrices are written straight into one
    huge-page mapping (hugepages.Arena), faulted in at once, where the system allows; fp32 mode memory-maps an F32
    file's large tensors and moves the others to huge pages afterwards; int8/int4 weights stay where PyTorch puts
    them (their steps gain ~1% from huge pages, and a mapping faulted in up front would hold the whole model
    beside the one whole-tensor transient of an exact int4 head)."""
    model, expected = skeleton(config, mode, head)
    arena = None
    if mode == "fp16":
        matrices = {id(t): t for t in (*model.parameters(), *model.buffers()) if t.is_meta and t.dim() >= 2}
        arena = hugepages.arena_for([(tuple(t.shape), t.dtype) for t in matrices.values()])
    seen = set()
    mapped: set[int] = set()
    converted = 0
    for name, w in weights:
        if name not in expected:
            raise CamelidError(f"{source}: unexpected tensor {name!r}; it does not belong to a {config.n_layers}-layer "
                               "model of this config")
        if tuple(w.shape) != expected[name]:
            raise CamelidError(f"{source}: tensor {name!r} has shape {list(w.shape)} but the config implies "
                               f"{list(expected[name])}; the weights and the config do not belong together")
        whole: dict[int, Tensor] = {}
        for module, attr, row in _destinations(model, name):
            _write(module, attr, row, w, whole, mapped, arena)
        del whole
        # the slices' temporaries lie between the kept buffers, so their pages would stay resident; handed back
        # every TRIM_EVERY values converted (a trim walks the heap: ~2 ms, too slow after every tensor)
        converted += math.prod(w.shape)
        if converted >= TRIM_EVERY:
            heap.trim()
            converted = 0
        seen.add(name)
    heap.trim()
    if config.tie_embeddings and "tok_embeddings.weight" in seen:
        seen.add("output.weight")
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CamelidError(f"{source}: missing tensor(s) {', '.join(missing[:3])}{more}; the file is incomplete or "
                           "belongs to a different config")
    if mode == "fp32":  # as quantize_model does; the file's memory maps stay as they are (no copy)
        hugepages.move_to_huge_pages(model, skip=mapped)
    model.rope.inv_freq = rope_inv_freq(config)  # a non-persistent buffer: not in the file
    return model.eval()


def save_quantized(model: Llama, path: str | Path) -> None:
    """Write the quantised weights as safetensors (atomically), with the mode and the model's config in the
    metadata so that `load_quantized(path)` needs nothing else."""
    from camelid.fileio import atomic_write

    mode = getattr(model, "quantized", None)
    if mode not in MODES:
        raise CamelidError("model is not quantised; call quantize_model(model, 'int8'|'int4') first")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"camelid_quantize": mode, "camelid_config": json.dumps(model.config.to_dict())}
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=meta))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of `path` (a one-line CamelidError if it is not a safetensors file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise CamelidError(f"{path}: not a readable safetensors file ({e}); write one with `camelid quantize`") from e


@torch.no_grad()
@heap.loading()
def load_quantized(path: str | Path) -> Llama:
    """Build the model described in a file written by `save_quantized`/`camelid quantize` and load its
    quantised weights. The model is built on the meta device, so no fp32 copy is ever allocated: peak
    memory is the quantised weights. safetensors only, nothing is unpickled."""
    meta = read_metadata(path)
    mode = meta.get("camelid_quantize")
    if mode not in MODES or "camelid_config" not in meta:
        raise CamelidError(f"{path}: no camelid quantisation metadata; write it with `camelid quantize`")
    config = LlamaConfig(**json.loads(meta["camelid_config"]))
    model = skeleton(config, mode, _head_mode(meta, path))[0]
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CamelidError(f"{path}: weights do not match the config (missing {missing[:3]}, extra {unexpected[:3]})")
    model.rope.inv_freq = rope_inv_freq(config)  # a non-persistent buffer: not in the file
    return model.eval()


def _head_mode(meta: dict[str, str], path: str | Path) -> str:
    # the file's own tensors say which kind the head is: int4 heads carry a `minimum`
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    if "output.minimum" in keys:
        return "int4"
    return "int8" if "output.scale" in keys else meta["camelid_quantize"]
