"""The vision objective for the training loop (`camelid vision train`): answer questions about generated scenes.

The text model is frozen; the image encoder and the cross-attention layers (or the projector) learn to answer
"What colour is the circle?" and five other kinds of question about scenes from camelid/vision/data.py. The loss
is the cross-entropy of the answer's tokens (and the end token) given the picture and the question.

Evaluation scores the held-out questions (unseen colour-shape combinations) and fresh questions on seen
combinations by exact match: an answer counts when the model's top token is the right one at every position of
the answer and at the end token, which is exactly when greedy decoding writes the answer and stops.
val_text_loss is the answer loss with no image on the first 50 held-out questions: the text model's own, which
training must not move.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from camelid.errors import CamelidError
from camelid.train.config import TrainConfig
from camelid.vision.data import (
    CELLS,
    COLOURS,
    KINDS,
    SHAPES,
    SIZES,
    Question,
    Scene,
    heldout_set,
    seen_set,
    training_example,
)
from camelid.vision.image import to_pixels
from camelid.vision.model import IGNORE, VisionConfig, VisionLlama
from camelid.vision.prompt import answer_ids, end_id, question_ids


class SceneTrainer(nn.Module):
    """What the loop trains: the vision model, plus a linear head that names what is in each cell of the scene
    (colour, shape, size, or nothing) from the image features pooled to the 3x3 grid.

    The head is a training aid, not part of the model (export writes `model` alone): a direct, dense signal that
    teaches the image encoder to see in a few hundred steps, where the answers alone reach it only through the
    frozen text model and the gates. Llama 3.2 Vision starts instead from an encoder pretrained on image-text
    pairs; this one starts from nothing. Scene labels come from training scenes only (no held-out pair), and half
    of the pictures the head sees are in shades of grey, their colours not asked: shape must then be seen apart
    from colour, which is what a never-seen colour-shape pair needs. The head also names each cell's place in the
    grid, so that the features keep where they are as plainly as what is there."""

    def __init__(self, model: VisionLlama, weight: float, prefix_cache: int = 0) -> None:
        super().__init__()
        self.model = model
        self.weight = weight
        self.scene_head = nn.Linear(model.vision_config.vit.dim,
                                    len(COLOURS) + len(SHAPES) + len(SIZES) + 3 + len(CELLS))
        # the image-free blocks' output per distinct prompt (a question and its answer: a few thousand in all),
        # computed once: the frozen text model's first blocks then cost nothing after the first epoch of prompts
        self.prefix_cache = PrefixCache(prefix_cache) if prefix_cache and model.image_free_blocks else None

    def answer_loss(self, input_ids: Tensor, pixels: Tensor, targets: Tensor) -> Tensor:
        if self.prefix_cache is None:
            return self.model(input_ids, images=pixels, targets=targets)
        h = self.model.hidden_states_from(self.prefix_cache.states(self.model, input_ids, targets), images=pixels)
        scored = targets != IGNORE
        return F.cross_entropy(self.model.text.output(h[scored]).float(), targets[scored])

    def forward(self, input_ids: Tensor | None, pixels: Tensor, targets: Tensor | None, scene_pixels: Tensor,
                cells: Tensor) -> Tensor:
        """The answers' loss plus `weight` x the cells' loss; without input_ids (the encoder's first steps) the
        cells' loss alone, and the text model is not run at all."""
        loss = 0.0 if input_ids is None else self.answer_loss(input_ids, pixels, targets)
        if not self.weight:
            return loss
        v = self.model.vision_config.vit
        features = self.model.vision(scene_pixels)  # [B, grid*grid, dim] (the encoder costs little)
        grid = features.view(-1, v.grid, v.grid, v.dim).permute(0, 3, 1, 2)
        cell = F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)  # [B, 9, dim]
        logits = self.scene_head(cell)
        *parts, where = logits.split([len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1, len(CELLS)], dim=-1)
        scene = sum(F.cross_entropy(p.flatten(0, 1), cells[..., i].flatten()) for i, p in enumerate(parts))
        # which cell each feature is: the position embedding alone would fade among the contents' features, and
        # the text model then cannot read where a shape is ("Where is the red circle?")
        cell_ids = torch.arange(len(CELLS), device=where.device).expand(where.shape[0], -1)
        scene = scene + F.cross_entropy(where.flatten(0, 1), cell_ids.flatten())
        return loss + self.weight * scene / 3


class PrefixCache:
    """The residual stream after a vision model's image-free blocks (VisionLlama.prefix_states), kept per row of
    token ids, at most `size` rows (then the oldest go). A row's states do not depend on the padding after it
    (causal attention), so each is stored at its own length; padding positions get zeros (never scored, never
    attended to by a real position)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: dict[tuple[int, ...], Tensor] = {}
        self.hits = self.misses = 0

    def states(self, model: VisionLlama, input_ids: Tensor, targets: Tensor) -> Tensor:
        scored = targets != IGNORE  # a row ends where its last target is (the end token's)
        lengths = [int(r.nonzero()[-1]) + 1 for r in scored]
        keys = [tuple(input_ids[i, :n].tolist()) for i, n in enumerate(lengths)]
        missing = sorted({k for k in keys if k not in self.rows}, key=len)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            longest = len(missing[-1])  # padded with token 0: causal attention keeps it out of the real positions
            batch = torch.tensor([list(k) + [0] * (longest - len(k)) for k in missing], device=input_ids.device)
            fresh = model.prefix_states(batch)
            for k, row in zip(missing, fresh, strict=True):
                self.rows[k] = row[:len(k)].clone()
        first = self.rows[keys[0]]
        out = first.new_zeros(input_ids.shape[0], input_ids.shape[1], first.shape[-1])
        for i, k in enumerate(keys):
            out[i, :len(k)] = self.rows[k]
        while len(self.rows) > self.size:
            del self.rows[next(iter(self.rows))]
        return out


def cell_labels(scene: Scene) -> list[list[int]]:
    """Per cell (reading order): colour, shape and size indices, each with 'nothing here' as the last class."""
    labels = [[len(COLOURS), len(SHAPES), len(SIZES)] for _ in CELLS]
    for s in scene.shapes:
        labels[s.cell] = [list(COLOURS).index(s.colour), SHAPES.index(s.shape), SIZES.index(s.size)]
    return labels


# in the `model` mapping, but this objective's, not the model's
TRAINING_SETTINGS = ("scene_loss", "encoder_steps", "heldout_questions", "prefix_cache")


def split_settings(model: dict) -> tuple[dict, dict]:
    """The `model` mapping of a vision config -> (VisionConfig fields, this objective's TRAINING_SETTINGS)."""
    return ({k: v for k, v in model.items() if k not in TRAINING_SETTINGS},
            {k: v for k, v in model.items() if k in TRAINING_SETTINGS})


HELDOUT_QUESTIONS = 600  # 100 of each kind, every one about an unseen colour-shape pair
SEEN_QUESTIONS = 300
EVAL_BATCH = 50
DATA = "scenes"  # the only data this objective knows: generated on the fly


class VisionQA:
    """An Objective (camelid/train/objectives.py) that `camelid vision train` hands to the training loop."""

    log_fields = ["val_loss", "val_acc", "val_seen_acc", "val_text_loss", *(f"val_acc_{k}" for k in KINDS)]
    plot_metric = ("val_acc", "held-out exact match")
    references: dict[str, float] = {}

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        from camelid.llm import load

        if cfg.data != DATA:
            raise CamelidError(f"objective vision trains on generated scenes: set data: {DATA} (got {cfg.data!r})")
        if not isinstance(cfg.model, dict) or "preset" in cfg.model:
            raise CamelidError("objective vision: model must be a mapping of vision settings (base, fusion, vit, "
                               "every, layers, cross_hidden, projector_hidden, pixel_shuffle), not a text preset")
        self.cfg, self.device = cfg, device
        spec, training = split_settings(cfg.model)
        self.scene_loss = float(training.get("scene_loss", 1.0))  # weight of SceneTrainer's cell labels (0: off)
        self.encoder_steps = int(training.get("encoder_steps", 0))  # first steps: the encoder alone, on the cells
        self.prefix_cache = int(training.get("prefix_cache", 0))  # prompts whose image-free states are kept
        if self.encoder_steps and not self.scene_loss:
            raise CamelidError("model.encoder_steps trains the encoder on the scene labels: set model.scene_loss > 0")
        # the last evaluation scores the first heldout_questions of the 600 (the kinds in turn): fewer on a busy machine
        self.heldout_n = int(training.get("heldout_questions", HELDOUT_QUESTIONS))
        if not 1 <= self.heldout_n <= HELDOUT_QUESTIONS:
            raise CamelidError(f"model.heldout_questions must be 1..{HELDOUT_QUESTIONS}, got {self.heldout_n}")
        config = VisionConfig.from_dict(spec)
        if Path(config.base).exists():  # a folder or file: recorded absolute, so the checkpoint finds it later
            config.base = str(Path(config.base).resolve())
        self.vision_config = config
        self.name = f"{config.fusion} vision model"
        # the frozen text model in the autocast dtype (nothing to update, so no fp32 master copy is needed); the
        # trained parts stay float32 (build_model)
        low = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
        self.base = load(config.base, device=device, dtype=low)
        if self.base.tokenizer is None:
            raise CamelidError(f"{config.base}: no tokenizer beside the text model; questions need one")
        self.tokenizer = self.base.tokenizer
        end_id(self.tokenizer)
        self.heldout = heldout_set(self.heldout_n)
        self.seen = seen_set(max(1, self.heldout_n * SEEN_QUESTIONS // HELDOUT_QUESTIONS))
        self._batches: dict[tuple[str, int], list[dict[str, Tensor]]] = {}
        self.step, self.evaluated = -1, False  # the last step a batch was made for; whether an evaluation ran

    def build_model(self) -> nn.Module:
        model = VisionLlama(self.base.model, self.vision_config, dtype=torch.float32)
        return SceneTrainer(model, self.scene_loss, self.prefix_cache).to(self.device)

    @staticmethod
    def blocks(model: nn.Module) -> nn.ModuleList:
        return model.model.vision.layers

    def flops_per_token(self) -> float:
        """An estimate per token of block_size (the loop's unit): the frozen text model's forward, its backward
        for activations from the first place the image enters, the trained parts' 6 per weight, the image
        encoder's work spread over the tokens."""
        c, v, T = self.base.config, self.vision_config, self.cfg.block_size
        text = c.num_params(exclude_embeddings=True)
        first = 0 if v.fusion == "projector" else v.cross_layers(c.n_layers)[0]
        backward = text * (c.n_layers - first) / c.n_layers
        vit = v.vit.n_layers * 12 * v.vit.dim ** 2 * v.vit.n_patches
        return 2.0 * text + 2.0 * backward + 6.0 * vit / T

    # -- batches --------------------------------------------------------------------------------------
    def collate(self, examples: list[tuple[Scene, Question]]) -> dict[str, Tensor]:
        """Pixels [B, 3, size, size], input ids [B, T] (image placeholders, question, answer; padded with the end
        token) and targets [B, T] (the answer's tokens and the end token where they are predicted, else IGNORE)."""
        tok, v = self.tokenizer, self.vision_config
        rows, targets = [], []
        for _, q in examples:
            prompt = [0] * v.image_tokens + question_ids(tok, q.question)
            answer = answer_ids(tok, q.answer)
            rows.append((prompt + answer)[:-1])
            targets.append([IGNORE] * (len(prompt) - 1) + answer)
        T = max(len(r) for r in rows)
        if T > self.cfg.block_size:
            raise CamelidError(f"a question and its answer take {T} tokens, more than block_size "
                               f"{self.cfg.block_size}; raise block_size")
        pad = end_id(tok)
        ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
        tgt = torch.tensor([t + [IGNORE] * (T - len(t)) for t in targets])
        pixels = torch.cat([to_pixels(scene.render(v.vit.image_size)) for scene, _ in examples])
        cells = torch.tensor([cell_labels(scene) for scene, _ in examples])
        grey = torch.tensor([i % 2 == 1 for i in range(len(examples))])  # the examples are in random order
        scene_pixels = torch.where(grey[:, None, None, None], pixels.mean(1, keepdim=True), pixels)
        cells[grey, :, 0] = IGNORE
        return {"input_ids": ids.to(self.device), "targets": tgt.to(self.device), "pixels": pixels.to(self.device),
                "scene_pixels": scene_pixels.to(self.device), "cells": cells.to(self.device)}

    def batch(self, step: int, index: int) -> dict[str, Tensor]:
        self.step = step
        rng = np.random.default_rng([self.cfg.seed, step, index])
        batch = self.collate([training_example(rng) for _ in range(self.cfg.batch_size)])
        if step < self.encoder_steps:  # the encoder learns to see first, the text model idle
            batch["input_ids"] = batch["targets"] = None
        return batch

    @staticmethod
    def loss(forward: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return forward(batch["input_ids"], batch["pixels"], batch["targets"], batch["scene_pixels"], batch["cells"])

    # -- evaluation -----------------------------------------------------------------------------------
    def _eval_batches(self, name: str, n: int) -> list[dict[str, Tensor]]:
        if (name, n) not in self._batches:
            examples = (self.heldout if name == "heldout" else self.seen)[:n]
            self._batches[(name, n)] = [self.collate(examples[i:i + EVAL_BATCH])
                                        for i in range(0, len(examples), EVAL_BATCH)]
        return self._batches[(name, n)]

    @torch.no_grad()
    def score(self, model: VisionLlama, batches: list[dict[str, Tensor]], image: bool = True) -> tuple[float, Tensor]:
        """(mean answer-token loss, per-question exact match [n] as bools)."""
        from camelid.train.objectives import autocast

        nll, count, correct = 0.0, 0, []
        for b in batches:
            with autocast(self.cfg, self.device):
                h = model.hidden_states(b["input_ids"], images=b["pixels"] if image else None)
            scored = b["targets"] != IGNORE
            logits = model.text.output(h[scored]).float()
            target = b["targets"][scored]
            nll += float(F.cross_entropy(logits, target, reduction="sum"))
            count += target.numel()
            wrong = torch.zeros(len(scored), dtype=torch.long, device=target.device)
            rows = scored.nonzero()[:, 0]
            wrong.index_add_(0, rows, (logits.argmax(-1) != target).long())
            correct.append(wrong == 0)
        return nll / max(1, count), torch.cat(correct).cpu()

    def evaluate(self, model: nn.Module, full: bool = False) -> dict[str, float]:
        """Held-out questions (the first eval_tokens / block_size of them unless `full` or eval_tokens is 0)."""
        cfg = self.cfg
        if not full and self.evaluated and self.step + 1 < self.encoder_steps:
            return {}  # the encoder alone is training: the text model is not reading the image yet (one baseline)
        self.evaluated = True
        n = self.heldout_n if full or not cfg.eval_tokens else \
            max(1, min(self.heldout_n, cfg.eval_tokens // cfg.block_size))
        model = model.model  # the vision model, without SceneTrainer's head
        was_training = model.training
        model.eval()
        held = self._eval_batches("heldout", n)
        loss, correct = self.score(model, held)
        _, seen_correct = self.score(model, self._eval_batches("seen", max(1, n * SEEN_QUESTIONS // HELDOUT_QUESTIONS)))
        text_loss, _ = self.score(model, held[:1], image=False)  # the first 50 questions: it must not move
        model.train(was_training)
        metrics = {"val_loss": loss, "val_acc": float(correct.float().mean()),
                   "val_seen_acc": float(seen_correct.float().mean()), "val_text_loss": text_loss}
        kinds = [q.kind for _, q in self.heldout[:n]]
        for kind in KINDS:
            picked = [c for c, k in zip(correct.tolist(), kinds, strict=True) if k == kind]
            metrics[f"val_acc_{kind}"] = sum(picked) / len(picked) if picked else float("nan")
        return metrics

    @staticmethod
    def describe(metrics: dict[str, float]) -> str:
        if not metrics:
            return "the image encoder alone is training (no evaluation)"
        metrics = {k: metrics.get(k, float("nan")) for k in VisionQA.log_fields}  # nan: no evaluation ran
        kinds = ", ".join(f"{k} {metrics.get(f'val_acc_{k}', float('nan')):.2f}" for k in KINDS)
        return (f"held-out loss {metrics['val_loss']:.4f}, exact match {metrics['val_acc']:.3f} on unseen "
                f"combinations ({kinds}), {metrics['val_seen_acc']:.3f} on seen ones; "
                f"text-only loss {metrics['val_text_loss']:.4f}")

    def intro(self) -> str:
        v, c = self.vision_config, self.base.config
        where = (f"cross-attention after text blocks {v.cross_layers(c.n_layers)}" if v.fusion == "cross-attention"
                 else f"a projector: {v.image_tokens} image tokens in the text sequence")
        return (f"{v.fusion}: a {v.vit.n_layers}-layer ViT ({v.vit.image_size}px, {v.vit.n_patches} patches) "
                f"joined to the frozen {c.name} by {where}; held-out: {self.heldout_n} questions on unseen "
                "colour-shape pairs")

    def sampler(self) -> Callable[[nn.Module, int], str]:
        """A few held-out questions answered by greedy decoding, for the log and out/samples.txt."""
        from camelid.generate import generate

        examples = [self.heldout[i] for i in (0, 1, 3, 5)]  # colour, shape, position, caption

        def sample(trainer: nn.Module, step: int) -> str:
            model, lines = trainer.model, []
            for scene, q in examples:
                with model.image(to_pixels(scene.render(self.vision_config.vit.image_size))):
                    ids = model.with_image_tokens(question_ids(self.tokenizer, q.question))
                    out = generate(model, ids, 24, stop_ids=self.tokenizer.stop_ids)
                answer = self.tokenizer.decode([i for i in out if i not in self.tokenizer.stop_ids]).strip()
                lines.append(f"{q.question} -> {answer!r} (truth: {q.answer!r})")
            return "\n".join(lines)

        return sample

    def export(self, model: nn.Module, state: dict[str, Tensor]) -> Path:
        """The trained parts and the name of the text model (camelid/vision/checkpoint.py) in cfg.export_path,
        which camelid.load reads."""
        from camelid.vision.checkpoint import save_vision

        return save_vision(model.model, self.cfg.export_path)
