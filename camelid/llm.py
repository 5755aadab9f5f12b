"""`camelid.load`: one entry point for every checkpoint format, returning an `LLM` (model + config + tokenizer).

Sources: a registered name (`camelid list`, default "smollm2-135m-instruct"), a Hugging Face Hub id
(org/name), a Hugging Face directory (config.json + safetensors), a .gguf file, or a Meta directory
(params.json + consolidated.*.pth), or a vision model's folder (vision.json: camelid/vision/).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from camelid import checksums, heap, hub
from camelid.config import LlamaConfig
from camelid.errors import CamelidError
from camelid.formats import Format, detect
from camelid.generate import SamplingParams, generate_tokens
from camelid.model import Llama
from camelid.tokenizer import Tokenizer

Message = dict[str, str]


@dataclass
class LLM:
    model: Llama
    config: LlamaConfig
    tokenizer: Tokenizer | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write a Hugging Face directory that `transformers.AutoModelForCausalLM.from_pretrained` loads."""
        from camelid.interop.hf import save_hf_dir

        out = save_hf_dir(self.model, path, dtype=dtype)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)
        return out

    # -- text in, text out -------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise CamelidError(f"{self.source or 'this model'} has no tokenizer; load one with the model "
                               "(tokenizer.json / tokenizer.model beside it) or pass token ids to camelid.generate")
        return self.tokenizer

    def encode_prompt(self, prompt: str, add_bos: bool | None = None) -> list[int]:
        tok = self._need_tokenizer()
        return tok.encode(prompt, add_bos=tok.add_bos if add_bos is None else add_bos)

    def stream(self, prompt: str | list[int], *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               seed: int | None = None, stop: Iterable[str] = (), add_bos: bool | None = None,
               stats: dict[str, float] | None = None, image: Any = None) -> Iterator[str]:
        """Yield the completion as text pieces while it decodes. Generation ends at the model's end-of-turn
        or end-of-text token (not included) or at the first `stop` string (not included). `image` (a path, bytes,
        a PIL image or image_pixels' pixels) needs a vision model (`camelid vision train`; camelid/vision/)."""
        tok = self._need_tokenizer()
        ids = prompt if isinstance(prompt, list) else self.encode_prompt(prompt, add_bos)
        if image is not None:
            pixels = self.image_pixels(image)
            with self.model.image(pixels):  # the image's keys and values (or tokens) are computed once, here
                yield from self.stream(self.model.with_image_tokens(ids), max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       repetition_penalty=repetition_penalty, seed=seed, stop=stop, stats=stats)
            return
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty)
        stop_ids = tok.stop_ids
        # a vision model without an image set is its text model: run that, on its fast paths
        model = self.model.text_only() if hasattr(self.model, "text_only") and not self.model.has_image else self.model
        tokens = generate_tokens(model, ids, max_new_tokens, params, stop_ids=stop_ids, seed=seed)
        stats = {} if stats is None else stats
        stats.update(prompt_tokens=len(ids), new_tokens=0, start=time.perf_counter())

        def until_stop_id(tokens: Iterator[int]) -> Iterator[int]:
            try:
                for t in tokens:
                    if t in stop_ids:
                        return
                    stats["new_tokens"] += 1
                    if stats["new_tokens"] == 1:
                        stats["first_token"] = time.perf_counter()
                    yield t
            finally:  # also when a stop string ends the reply early
                stats["end"] = time.perf_counter()

        pieces = tok.stream(until_stop_id(tokens))
        try:
            yield from cut_at_stop_strings(pieces, list(stop))
        finally:
            pieces.close()  # closes the token generator too: the KV cache is freed, the end time recorded

    def generate(self, prompt: str | list[int], **kwargs: Any) -> str:
        """The completion of `prompt` as one string (see `stream` for the options; temperature 0 is greedy)."""
        return "".join(self.stream(prompt, **kwargs))

    def image_pixels(self, image: Any) -> torch.Tensor:
        """A picture (a path, bytes, a PIL image, or pixels this returned before) as the pixels this vision model
        takes; a one-line error for a text-only model or a file that is not a picture."""
        vision = getattr(self.model, "vision_config", None)
        if vision is None:
            raise CamelidError(f"{self.source or 'this model'} is a text-only model and cannot look at an image; "
                               "give a vision model trained with `camelid vision train` (its output folder)")
        if isinstance(image, torch.Tensor):
            return image
        from camelid.vision.image import load_image

        return load_image(image, vision.vit.image_size)

    def chat_prompt(self, messages: list[Message]) -> list[int]:
        """Render `messages` with the model's chat template and tokenise them, ready for the reply (a vision
        model: in the format it was trained on, camelid/vision/prompt.py)."""
        tok = self._need_tokenizer()
        if hasattr(self.model, "vision_config"):
            from camelid.vision.prompt import conversation_ids

            return conversation_ids(tok, messages)
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        starts_with_bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
        return tok.encode(text, add_bos=tok.add_bos and not starts_with_bos)

    def chat_stream(self, messages: list[Message], **kwargs: Any) -> Iterator[str]:
        return self.stream(self.chat_prompt(messages), **kwargs)

    def chat(self, messages: list[Message], **kwargs: Any) -> str:
        """The assistant's reply to a conversation given as [{"role": ..., "content": ...}, ...]."""
        return "".join(self.chat_stream(messages, **kwargs))


def cut_at_stop_strings(pieces: Iterable[str], stop: list[str]) -> Iterator[str]:
    """Pass text through until a stop string appears; text that could begin a stop string is held back."""
    stop = [s for s in stop if s]
    if not stop:
        yield from pieces
        return
    hold = max(len(s) for s in stop) - 1
    buf = ""
    for piece in pieces:
        buf += piece
        hits = [i for i in (buf.find(s) for s in stop) if i >= 0]
        if hits:
            if min(hits):
                yield buf[: min(hits)]
            return
        if len(buf) > hold:
            yield buf[: len(buf) - hold]
            buf = buf[len(buf) - hold:]
    if buf:
        yield buf


def resolve(source: str | os.PathLike) -> Path:
    """A name, Hub id or path of a model -> a local path (camelid.hub.resolve; a tokenizer's name is refused)."""
    text = str(source)
    if text in hub.MODELS and hub.MODELS[text].kind == "tokenizer":
        raise CamelidError(f"{text} is a tokenizer, not a model; use camelid.tokenizer.Tokenizer.load({text!r})")
    return hub.resolve(source, kinds=hub.LLM_KINDS)


def model_tokenizer(path: Path, fmt: Format | None = None) -> Tokenizer | None:
    """The tokenizer stored with the model at `path` (a GGUF's embedded vocabulary, the tokenizer files of a
    Hugging Face or Meta folder, those beside a quantised file), or None when it has none."""
    fmt = fmt or detect(path)
    if fmt is Format.GGUF:
        from camelid.tokenizer.gguf import has_vocabulary

        return Tokenizer.from_gguf(path) if has_vocabulary(path) else None
    folder = path.parent if fmt is Format.QUANTIZED else path
    names = ("tokenizer.json",) if fmt is Format.QUANTIZED else ("tokenizer.json", "tokenizer.model")
    if folder.is_dir() and any((folder / f).is_file() for f in names):
        return Tokenizer.from_dir(folder)
    return None


def verify_folder(path: Path, fmt: Format) -> None:
    """A folder camelid wrote with a SHA256SUMS (a run's export, a training checkpoint): every file it lists must
    be whole, or a one-line CamelidError names the first that is not."""
    if fmt is Format.CHECKPOINT:
        from camelid.train import checkpoint

        checkpoint.verify(path if (path / "meta.json").is_file() else checkpoint.latest(path))
    elif path.is_dir() and checksums.has_manifest(path):
        checksums.verify(path, f"restore the folder or export it again; if you changed that file on purpose, delete "
                               f"{path / checksums.MANIFEST} to load the folder unchecked")


@heap.loading()
def load(source: str | os.PathLike = "smollm2-135m-instruct", *, dtype: torch.dtype | None = None,
         device: str | torch.device = "cpu", tokenizer: bool = True, quantize: str | None = None,
         adapter: str | os.PathLike | None = None, merge_adapter: bool = True) -> LLM:
    """Load a model (see the module docstring for the accepted sources).

    `quantize="int8"|"int4"` makes the linear layers weight-only quantised (C++ kernels for decode on CPU);
    `"fp16"` stores the weights in 16 bits and computes in fp32 (half the memory; an F16 GGUF's weights exactly);
    `"fp32"` keeps fp32 weights but takes the same fused fast path. A `.safetensors` file written by
    `camelid quantize` loads quantised directly, without an fp32 copy.

    `adapter`: a LoRA adapter folder (peft's format: `camelid finetune` writes one, so does peft) applied to the
    base. By default it is merged into the weights (exact to float rounding), so every fast path applies; with
    `merge_adapter=False` the model keeps LoRALinear modules (camelid.variants.lora) over its base, quantised
    per projection when `quantize` is int8/int4 (QLoRA's layout), for switching adapters off or inspecting them.
    """
    path = resolve(source)
    fmt = detect(path)
    if adapter is not None and fmt is Format.QUANTIZED:
        raise CamelidError(f"{source}: a file from `camelid quantize` is fused; apply the adapter to the base "
                           "checkpoint it came from (HF folder, .gguf or Meta folder) instead")
    verify_folder(path, fmt)
    if fmt is Format.VISION:  # `camelid vision train`: an image encoder joined to the text model it names
        if adapter is not None:
            raise CamelidError(f"{source}: adapters apply to text models; merge it into the base model "
                               "(camelid adapter merge) and train the vision model on that")
        from camelid.vision.checkpoint import base_model, load_vision

        base = load(base_model(path), dtype=dtype, device=device, tokenizer=tokenizer, quantize=quantize)
        return LLM(model=load_vision(path, base.model), config=base.config, tokenizer=base.tokenizer,
                   source=str(path), extra={"base": base.source})
    if fmt is Format.QUANTIZED:
        from camelid.variants.quantized import load_quantized

        model = load_quantized(path)
        tok = model_tokenizer(path, fmt) if tokenizer else None
        return LLM(model=model, config=model.config, tokenizer=tok, source=str(path))
    if fmt is Format.HF:
        from camelid.interop.hf import load_hf_dir

        config, model = load_hf_dir(path, dtype=dtype, device=device)
    elif fmt is Format.GGUF:
        from camelid.interop.gguf import load_gguf

        # the vocabulary first: reading it costs transient memory that is then not on top of the weights
        tok = model_tokenizer(path, fmt) if tokenizer else None

        # quantised as it loads (no fp32 copy of the model), unless an adapter is merged into fp32 weights first
        direct = quantize if adapter is None else None
        config, model = load_gguf(path, dtype=dtype, device=device, quantize=direct)
        if direct is not None:
            quantize = None
    elif fmt is Format.META:
        from camelid.interop.meta import load_meta_dir

        config, model = load_meta_dir(path, dtype=dtype, device=device)
    elif fmt is Format.BERT:
        raise CamelidError(f"{source}: a BERT model; camelid.load reads LLaMA-family models, load BERT with "
                           "camelid.interop.bert_hf.load_bert_hf_dir or use it in `camelid classify`")
    elif fmt is Format.CHECKPOINT:
        raise CamelidError(f"{source}: a training checkpoint; `camelid pretrain` writes the finished model to "
                           "OUT/hf, load that (or resume training with --resume)")
    else:
        raise CamelidError(
            f"{source}: a tokenizer, not a model camelid can load; expected a Hugging Face directory (config.json), "
            "a .gguf file or a Meta directory (params.json + consolidated.*.pth)"
        )
    if fmt is not Format.GGUF:
        tok = model_tokenizer(path, fmt) if tokenizer else None
    extra: dict[str, Any] = {}
    if adapter is not None:
        from camelid.variants import lora

        if not merge_adapter and quantize in ("int8", "int4"):
            lora.quantize_base(model, quantize)
        lora.load_adapter(model, adapter)
        extra["adapter"] = str(adapter)
        if not merge_adapter:
            return LLM(model=model.eval(), config=config, tokenizer=tok, source=str(path), extra=extra)
        lora.merge_lora(model)
    if quantize:
        from camelid.variants.quantized import quantize_model

        quantize_model(model, quantize)
    return LLM(model=model.eval(), config=config, tokenizer=tok, source=str(path), extra=extra)
