"""LoRA and QLoRA, applied from outside the reference model: `apply_lora(model, rank=8, alpha=16)`.

Each targeted linear layer of every block becomes a `LoRALinear` holding the original module as `base` (frozen,
untouched) and two small trained matrices: y = base(x) + B(A(dropout(x))) * alpha / rank, with A [rank, in]
initialised like nn.Linear's weight and B [out, rank] at zero, so a fresh adapter computes exactly the base
model's function (peft's LoRA, the same formula in the same order). The base may be a plain nn.Linear (fp32 or
bf16) or camelid's frozen int8/int4 linears (QLoRA: `quantize_base` first), whose backward rebuilds each weight on
the fly (camelid.ops.linear) so the fp32 matrices are never kept.

`merge_lora` folds the adapters into plain nn.Linear weights (W + scale * B @ A), after which the model is the
reference again and every export (HF, GGUF, Meta) and every fast path (fuse, quantize_model, the C++ decode step)
applies to it. `save_adapter` / `load_adapter` read and write the adapter alone in peft's format
(adapter_config.json + adapter_model.safetensors; camelid.interop.peft), which is also what training checkpoints
of a LoRA run hold. The output head and the embedding are never targeted (a tied head is the embedding).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.errors import CamelidError
from camelid.interop import peft
from camelid.interop.hf import hf_to_camelid_name
from camelid.model import Llama, rope_inv_freq
from camelid.ops.linear import matmul_t, quantize_int8
from camelid.variants.quantized import FastLinear, Int4Linear, Int8Embedding, Int8Linear

# the linear layers of a block, by camelid's names (HF: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
BASES = (nn.Linear, Int8Linear, Int4Linear, FastLinear)


@dataclass
class LoraSpec:
    """What `apply_lora` does: rank and alpha (scale = alpha / rank, or alpha / sqrt(rank) with rslora), dropout
    on the adapter's input while training, and which linears of every block it wraps (`TARGETS` by default)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()] \
                if self.targets != "all" else list(TARGETS)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise CamelidError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, int | float) or self.alpha <= 0:
            raise CamelidError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise CamelidError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise CamelidError(f"LoRA targets {unknown or self.targets!r} are not linears of a block; choose among "
                               f"{', '.join(TARGETS)} (or 'all')")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class _LoraProduct(torch.autograd.Function):
    """x W^T (+ bias) + scale * (x A^T) B^T for a plain linear base, with a backward that accumulates the adapter's
    share of dL/dx into the base's product in place: the same math as autograd's, without its [tokens, out] and
    [tokens, in] temporaries (a LoRA step is ~5% faster)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,  # noqa: ANN001 - ctx
                scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ a.t()
        out = matmul_t(x2, weight, bias)
        out.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scale, ctx.x_shape, ctx.has_bias = scale, x.shape, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # noqa: ANN001 - ctx
        x2, xa, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        dxa = (g @ b).mul_(ctx.scale)
        dx = matmul_t(g, weight.t()).addmm_(dxa, a).view(ctx.x_shape) if need_x else None
        dw = matmul_t(g.t(), x2.t()) if need_w else None
        dbias = g.sum(0) if need_bias and ctx.has_bias else None
        da = dxa.t() @ x2 if need_a else None
        db = (g.t() @ xa).mul_(ctx.scale) if need_b else None
        return dx, dw, dbias, da, db, None


class LoRALinear(nn.Module):
    """base(x) + B(A(dropout(x))) * scale, with `base` frozen. Parameters: lora_a [rank, in], lora_b [out, rank]."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        weight = _weight_like(base)
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora = rank, float(alpha), rslora
        self.scale = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's init, as peft and loralib do
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base(x)
        # training only: without gradients the base module's own product keeps a zero adapter's output exactly the
        # base's
        if (isinstance(self.base, nn.Linear) and isinstance(self.dropout, nn.Identity) and x.dtype == self.lora_a.dtype
                and torch.is_grad_enabled()
                and self.base.weight.dtype == x.dtype and not torch.is_autocast_enabled(x.device.type)):
            return _LoraProduct.apply(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b, self.scale)
        y = self.base(x)
        xa = F.linear(self.dropout(x.to(self.lora_a.dtype)), self.lora_a)
        # y + scale * xa B^T in one product: no [tokens, out] temporaries, and the backward scales [tokens, rank]
        out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, self.rank), self.lora_b.t(), alpha=self.scale)
        return out.view(y.shape)

    def delta(self) -> Tensor:
        """The adapter as a weight update: scale * B @ A, [out, in]."""
        return (self.lora_b @ self.lora_a) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def _weight_like(base: nn.Module) -> Tensor:
    """A tensor with the dtype and device the adapter should have: the base's weight, fp32 for quantised bases."""
    if isinstance(base, nn.Linear | FastLinear):
        w = base.weight
        return w if w.dtype.is_floating_point else w.float()
    if isinstance(base, Int8Linear | Int4Linear):
        return base.scale.float()
    raise CamelidError(f"LoRA wraps nn.Linear and camelid's int8/int4 linears, not {type(base).__name__}")


def _block_linears(model: Llama, targets: Sequence[str]) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(path, parent, name, module) of each targeted linear of every block, in order."""
    for i, block in enumerate(model.layers):
        for pname, parent in block.named_modules():
            for name, child in parent.named_children():
                if name in targets:
                    yield f"layers.{i}.{pname}.{name}", parent, name, child


def apply_lora(model: Llama, rank: int | LoraSpec = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Sequence[str] | str = TARGETS, rslora: bool = False) -> Llama:
    """Wrap the `targets` linears of every block in LoRALinear (new modules holding the old ones), freeze every
    other parameter of the model, and return it. A fresh adapter leaves the model's function unchanged."""
    spec = rank if isinstance(rank, LoraSpec) else LoraSpec(rank, alpha, dropout, list(targets) if not
                                                            isinstance(targets, str) else targets, rslora)
    layer0 = model.layers[0]
    if hasattr(layer0.attention, "wqkv") or hasattr(layer0.feed_forward, "w13"):
        raise CamelidError("LoRA needs the unfused model: apply it before fuse() / quantize_model(), or merge the "
                           "adapter first and then fuse")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise CamelidError("the model already has LoRA adapters; merge_lora() them first or start from the base")
    model.requires_grad_(False)
    for path, parent, name, lin in list(_block_linears(model, spec.targets)):
        if not isinstance(lin, BASES):
            raise CamelidError(f"{path} is a {type(lin).__name__}; LoRA wraps nn.Linear and camelid's int8/int4 "
                               "linears")
        if spec.rank > min(lin.in_features, lin.out_features):
            raise CamelidError(f"LoRA rank {spec.rank} is larger than {path} ({lin.in_features} -> "
                               f"{lin.out_features}); use a rank of at most {min(lin.in_features, lin.out_features)}")
        setattr(parent, name, LoRALinear(lin, spec.rank, spec.alpha, spec.dropout, spec.rslora))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of the model by its path (layers.3.attention.wq), in order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_spec(model: nn.Module) -> LoraSpec:
    """The spec the model's adapters were made with (rank and alpha of the first; targets of all)."""
    mods = lora_modules(model)
    if not mods:
        raise CamelidError("the model has no LoRA adapters; apply_lora() or load_adapter() first")
    first = next(iter(mods.values()))
    targets = sorted({p.rsplit(".", 1)[-1] for p in mods}, key=TARGETS.index)
    p = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return LoraSpec(first.rank, first.alpha, p, targets, first.rslora)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors under camelid names: {path}.lora_a and {path}.lora_b."""
    out = {}
    for path, m in lora_modules(model).items():
        out[f"{path}.lora_a"], out[f"{path}.lora_b"] = m.lora_a.detach(), m.lora_b.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, tensors: dict[str, Tensor], source: str = "the adapter") -> None:
    """Copy adapter tensors (camelid names) into the model's LoRALinear modules; every name and shape must fit."""
    mods = lora_modules(model)
    expected = {f"{p}.lora_{ab}" for p in mods for ab in "ab"}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if unexpected:
        raise CamelidError(f"{source}: holds {unexpected[0]} (and {len(unexpected) - 1} more), which this model "
                           "has no adapter for; it belongs to another base model or target set")
    if missing:
        raise CamelidError(f"{source}: lacks {missing[0]} (and {len(missing) - 1} more); the adapter is incomplete")
    for path, m in mods.items():
        for ab in "ab":
            t, mine = tensors[f"{path}.lora_{ab}"], getattr(m, f"lora_{ab}")
            if tuple(t.shape) != tuple(mine.shape):
                raise CamelidError(f"{source}: {path}.lora_{ab} has shape {list(t.shape)}, but {path} of this base "
                                   f"takes {m.in_features} inputs and gives {m.out_features} outputs "
                                   f"(expected {list(mine.shape)}); the adapter was trained on another base model")
            mine.copy_(t)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (e.g. a DPO reference, or before/after comparisons)."""
    mods = list(lora_modules(model).values())
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, b in zip(mods, before, strict=True):
            m.enabled = b


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear whose weight is W + scale * B @ A (a quantised base is
    dequantised first: the merged layer is fp32). In place; returns the model."""
    for path, m in list(lora_modules(model).items()):
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        base = m.base
        w = base.dequantize() if isinstance(base, Int8Linear | Int4Linear) else base.weight.detach()
        merged = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        merged.weight = nn.Parameter((w.float() + m.delta().float()).to(_weight_like(base).dtype),
                                     requires_grad=False)
        setattr(parent, path.rpartition(".")[2], merged)
    return model


@torch.no_grad()
def quantize_base(model: Llama, mode: str) -> Llama:
    """QLoRA's frozen base: each linear of every block becomes camelid's Int8Linear or Int4Linear (int4 in groups
    of 32, int8 where the input width is not a multiple of 32), unfused so LoRA can wrap each projection. The
    embedding and the output head stay as they are (as in QLoRA). In place; returns the model."""
    kinds = {"int8": Int8Linear, "int4": Int4Linear}
    if mode not in kinds:
        raise CamelidError(f"unknown base quantisation {mode!r}; choose int8 or int4 (or none)")
    for _path, parent, name, lin in list(_block_linears(model, TARGETS)):
        if not isinstance(lin, nn.Linear) or lin.bias is not None:
            continue  # Qwen2's q/k/v have biases: those stay in full precision
        kind = kinds[mode]
        if kind is Int4Linear and lin.in_features % 32:
            kind = Int8Linear
        setattr(parent, name, kind(lin.weight))
    model.requires_grad_(False)
    return model


@torch.no_grad()
def quantize_head(model: Llama) -> Llama:
    """QLoRA's frozen embedding and output head as int8 rows (one fp32 scale per row; a tied head and the
    embedding share one Int8Linear): the lookup dequantises the rows it reads, the training loss runs the head
    through camelid.ops.head_loss.int8_head_loss, which dequantises it a block of rows at a time. For SmolLM2
    this keeps 28 MB of codes instead of the 113 MB fp32 table. In place; returns the model."""
    if isinstance(model.output, Int8Linear):
        return model
    tied = model.config.tie_embeddings or model.output.weight is model.tok_embeddings.weight
    head = _int8_rows(model.output.weight)
    model.output = head
    if tied:
        model.tok_embeddings = Int8Embedding(shared=head)
    else:
        emb = Int8Embedding(torch.empty(model.tok_embeddings.weight.shape, device="meta"))
        emb.table = _int8_rows(model.tok_embeddings.weight)
        model.tok_embeddings = emb
    return model.requires_grad_(False)


def _int8_rows(weight: Tensor, rows: int = 4096) -> Int8Linear:
    """Int8Linear(weight), quantised a block of rows at a time (no whole-table fp32 temporaries)."""
    lin = Int8Linear(torch.empty(weight.shape, device="meta"))
    lin.qweight, lin.scale = torch.empty(weight.shape, dtype=torch.int8), torch.empty(weight.shape[0])
    for s in range(0, weight.shape[0], rows):
        lin.qweight[s:s + rows], lin.scale[s:s + rows] = quantize_int8(weight[s:s + rows])
    return lin


@torch.no_grad()
def build_quantized_base(model: Llama, tensors: Iterable[tuple[str, Tensor]], mode: str, source: str) -> Llama:
    """Fill `model`, built on the meta device (the reference Llama or its training twin), from a stream of Hugging
    Face-named fp32 tensors (camelid.interop.hf.read_hf_tensors, camelid.interop.gguf.read_gguf_tensors),
    quantising each bias-free block linear to int8/int4 as it arrives: peak memory is the quantised model plus one
    fp32 tensor, never the fp32 model (what `quantize_base` on a loaded model needs). Returns the model, frozen."""
    kinds = {"int8": Int8Linear, "int4": Int4Linear}
    if mode not in kinds:
        raise CamelidError(f"unknown base quantisation {mode!r}; choose int8 or int4 (or none)")
    expected = dict(model.state_dict())
    for hf_name, t in tensors:
        name = hf_to_camelid_name(hf_name)
        if name is None:
            continue
        if name not in expected:
            raise CamelidError(f"{source}: unexpected tensor {hf_name!r} for this {model.config.n_layers}-layer model")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CamelidError(f"{source}: tensor {hf_name!r} has shape {list(t.shape)}, the config implies "
                               f"{list(expected[name].shape)}")
        path, _, leaf = name.rpartition(".")
        parent_path, _, child = path.rpartition(".")
        module = model.get_submodule(path)
        if (isinstance(module, nn.Linear) and module.bias is None and child in TARGETS and path.startswith("layers.")
                and leaf == "weight"):
            kind = kinds[mode] if not (mode == "int4" and t.shape[1] % 32) else Int8Linear
            setattr(model.get_submodule(parent_path), child, kind(t))
        else:
            setattr(module, leaf, nn.Parameter(t.float(), requires_grad=False))
    model.tie_weights()
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta and n != "rope.inv_freq"]
    if missing:
        raise CamelidError(f"{source}: missing tensor(s) {', '.join(missing[:3])}; the checkpoint is incomplete")
    model.rope.inv_freq = rope_inv_freq(model.config)
    return model.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied head is counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for b in model.buffers():  # quantised weights are buffers
        if b.dtype in (torch.int8, torch.uint8):
            total += b.numel() * (2 if b.dtype == torch.uint8 else 1)  # two int4 codes per byte
    return trainable, total


# ---------------------------------------------------------------------------------------------------
# adapters on disk: peft's format (camelid.interop.peft)


def save_adapter(model: nn.Module, path: str | os.PathLike, base: str = "") -> Path:
    """Write the model's adapters as a peft LoRA folder (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(transformers_model, path)` and `load_adapter` read. `base` names the base
    model (adapter_config's base_model_name_or_path)."""
    spec = lora_spec(model)
    return peft.save_peft_adapter(path, lora_state_dict(model), rank=spec.rank, alpha=spec.alpha,
                                  dropout=spec.dropout, targets=spec.targets, rslora=spec.rslora, base=base)


def save_gguf_adapter(model: nn.Module, path: str | os.PathLike, name: str = "") -> Path:
    """Write the model's adapters as a GGUF LoRA adapter that llama.cpp applies to the base model's GGUF."""
    from camelid.interop.gguf_lora import save_gguf_adapter as write

    spec = lora_spec(model)
    return write(path, lora_state_dict(model), model.config, alpha=spec.alpha, rslora=spec.rslora, name=name)


def read_adapter(path: str | os.PathLike) -> tuple[LoraSpec, dict[str, Tensor], str]:
    """(spec, camelid-named tensors, base model name) of a peft LoRA folder, e.g. one peft itself wrote."""
    a = peft.read_peft_adapter(path)
    spec = LoraSpec(a.rank, a.alpha, a.dropout, a.targets, a.rslora)
    return spec, a.tensors, a.base


def load_adapter(model: Llama, path: str | os.PathLike) -> Llama:
    """Apply the peft LoRA adapter at `path` to `model` (a camelid Llama, unfused) and load its weights; a rank
    that differs per layer (peft's rank_pattern) is taken from the tensors. Returns the model."""
    spec, tensors, _base = read_adapter(path)
    source = str(Path(path) / peft.WEIGHTS_NAME)
    shapes = {k.rsplit(".", 1)[0]: t.shape[0] for k, t in tensors.items() if k.endswith(".lora_a")}
    wrapped = {p: m for p, _parent, _n, m in _block_linears(model, spec.targets)}
    extra = sorted(set(shapes) - set(wrapped))
    if extra:
        raise CamelidError(f"{source}: has an adapter for {extra[0]}, which this {len(model.layers)}-layer model "
                           "does not have; the adapter was trained on another base model")
    apply_lora(model, spec)
    for path_, m in lora_modules(model).items():  # per-layer ranks: resize the modules the tensors say
        r = shapes.get(path_)
        if r is not None and r != m.rank:
            parent = model.get_submodule(path_.rpartition(".")[0])
            setattr(parent, path_.rpartition(".")[2], LoRALinear(m.base, r, spec.alpha, spec.dropout, spec.rslora))
    present = {p: m for p, m in lora_modules(model).items() if p in shapes}
    for p in set(lora_modules(model)) - set(present):  # layers the adapter leaves alone (layers_to_transform)
        parent = model.get_submodule(p.rpartition(".")[0])
        setattr(parent, p.rpartition(".")[2], lora_modules(model)[p].base)
    load_lora_state_dict(model, tensors, source)
    return model


__all__ = ["BASES", "TARGETS", "LoRALinear", "LoraSpec", "apply_lora", "build_quantized_base", "load_adapter",
           "load_lora_state_dict", "lora_disabled", "lora_modules", "lora_spec", "lora_state_dict", "merge_lora",
           "quantize_base", "quantize_head", "read_adapter", "save_adapter", "save_gguf_adapter",
           "trainable_parameters"]
