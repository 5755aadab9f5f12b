"""VisionLlama: built around a frozen Llama from the outside; zero gates change nothing, bit for bit; image keys
and values are computed once per image; text-only requests skip the vision parts; only trained tensors are saved."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pixels, tiny_text, tiny_vision

from camelid import CamelidError, Llama
from camelid.generate import generate
from camelid.model import Block
from camelid.variants.fused import fuse
from camelid.vision import VisionConfig, VisionLlama
from camelid.vision.cross_attention import BlockThenCrossAttention


@pytest.mark.parametrize("fused", [False, True])
def test_zero_gates_equal_the_text_model_bit_for_bit(fused: bool) -> None:
    text = fuse(tiny_text()) if fused else tiny_text()
    ids = torch.randint(0, text.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = text(ids)
    model = tiny_vision(fused=fused)
    with torch.no_grad():
        assert torch.equal(model(ids), expected)  # no image
        assert torch.equal(model(ids, images=pixels(2)), expected)  # an image, gates closed
    if fused:
        return  # a fused Llama decodes through C++ (equal to rounding); the PyTorch path is compared below
    greedy = generate(text, ids[0].tolist(), 8)
    with model.image(pixels(1)):
        assert model.has_image
        assert generate(model, ids[0].tolist(), 8) == greedy  # cached decode steps too
        text.setup_cache(1, 20)
        model.setup_cache(1, 20)
        positions = torch.arange(12)
        with torch.no_grad():
            assert torch.equal(model(ids[:1], positions), text(ids[:1], positions))  # through the KV cache
    assert not model.has_image


def test_zero_gates_bit_for_bit_in_bfloat16() -> None:
    text = tiny_text().to(torch.bfloat16)
    ids = torch.randint(0, text.config.vocab_size, (2, 12))
    model = VisionLlama(tiny_text().to(torch.bfloat16), tiny_vision().vision_config, dtype=torch.float32)
    assert model.cross[0].attention.wq.weight.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(ids, images=pixels(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(got, text(ids))


def test_open_gates_see_the_image_and_text_only_requests_skip_it() -> None:
    model = tiny_vision(open_gates=True)
    ids = torch.randint(0, 320, (2, 12))
    calls = []
    for cross in model.cross:
        cross.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        a, b = model(ids, images=pixels(2, seed=0)), model(ids, images=pixels(2, seed=1))
        assert not torch.allclose(a, b)  # different pictures, different logits
        n = len(calls)
        assert torch.equal(model(ids), tiny_text()(ids))  # no image: the text model alone, layers skipped
    assert n == 2 * len(model.cross) and len(calls) == n


@pytest.mark.parametrize("fusion", ["cross-attention", "projector"])
def test_cached_decoding_with_an_image_matches_the_full_pass(fusion: str) -> None:
    """Each decode step through the KV cache gives the logits a full pass over the sequence gives."""
    model = tiny_vision(fusion, open_gates=True)
    if fusion == "projector":
        with torch.no_grad():
            for p in model.projector.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    prompt = model.with_image_tokens(torch.randint(1, 320, (6,)).tolist())
    img = pixels(1)
    with model.image(img):
        out = generate(model, prompt, 6)
    full = torch.tensor([prompt + out[:-1]])
    with torch.no_grad():
        logits = model(full, images=img)
    assert logits[0, len(prompt) - 1:].argmax(-1).tolist() == out
    # the image changes what is generated
    with model.image(pixels(1, seed=5)):
        assert generate(model, prompt, 6) != out or fusion == "projector"


def test_image_keys_and_values_are_computed_once_per_image() -> None:
    model = tiny_vision(open_gates=True)
    encoded, projected = [], []
    model.vision.register_forward_hook(lambda *a: encoded.append(1))
    model.cross[0].attention.wk.register_forward_hook(lambda *a: projected.append(1))
    with model.image(pixels(1)):
        generate(model, [5, 6, 7], 10)
        generate(model, [5, 6, 7, 8], 4)  # another prompt about the same picture
    assert len(encoded) == 1 and len(projected) == 1


def test_projector_puts_image_tokens_in_the_sequence() -> None:
    model = tiny_vision("projector", pixel_shuffle=2)
    assert model.image_tokens == (16 // 4 // 2) ** 2 == model.vision_config.image_tokens
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        expected = tiny_text()(ids)
        assert torch.equal(model(ids), expected)  # no image: unchanged
        with_image = model(ids, images=pixels(1))
    assert not torch.allclose(with_image[:, :4], expected[:, :4])
    with pytest.raises(CamelidError, match="placeholder"):
        model(ids[:, :2], images=pixels(1))


def test_built_from_outside_and_only_trained_tensors_saved() -> None:
    model = tiny_vision()
    assert model.layer_ids == [1, 3]
    assert [type(b) for b in model.text.layers] == [Block, BlockThenCrossAttention, Block, BlockThenCrossAttention]
    assert all(not p.requires_grad for n, p in model.text.named_parameters() if ".cross." not in n)
    state = model.state_dict()
    assert state and all(k.startswith(("vision.", "cross.")) for k in state)
    assert sum(v.numel() for v in state.values()) == model.trainable_parameters()
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"vision", "cross"}
    again = tiny_vision()
    again.load_state_dict(state)
    with pytest.raises(CamelidError, match="do not fit"):
        again.load_state_dict({k: v for k, v in state.items() if "vision" not in k})
    with pytest.raises(CamelidError, match="already joined"):
        VisionLlama(model.text, model.vision_config)


def test_config_errors_are_one_line() -> None:
    with pytest.raises(CamelidError, match="fusion"):
        VisionConfig.from_dict({"fusion": "glue"})
    with pytest.raises(CamelidError, match="unknown field"):
        VisionConfig.from_dict({"colour": 1})
    with pytest.raises(CamelidError, match="unknown vit field"):
        VisionConfig.from_dict({"vit": {"size": 1}})
    with pytest.raises(CamelidError, match="block indices"):
        VisionLlama(tiny_text(), VisionConfig(layers=[7]))
    with pytest.raises(CamelidError, match="pixel_shuffle"):
        tiny_vision("projector", pixel_shuffle=3)
    with pytest.raises(CamelidError, match="shape"):
        tiny_vision()(torch.zeros(1, 3, dtype=torch.long), images=torch.zeros(1, 3, 8, 8))


def test_training_from_cached_image_free_states_gives_the_full_pass_loss() -> None:
    from camelid.vision.model import IGNORE
    from camelid.vision.objective import PrefixCache, SceneTrainer

    model = tiny_vision(open_gates=True)  # every=2: blocks 0 (and its cross layer at 1) onwards
    assert model.image_free_blocks == model.layer_ids[0] == 1
    assert tiny_vision("projector").image_free_blocks == 0
    ids = torch.randint(1, model.config.vocab_size, (3, 10))
    targets = torch.full((3, 10), IGNORE)
    targets[0, 4:8] = ids[0, 5:9]  # rows of lengths 8, 10 and 6 (padding after them is never scored)
    targets[1, 6:] = 7
    targets[2, 3:6] = 5
    ids[2, 6:] = 0
    images = pixels(3)
    trainer = SceneTrainer(model, weight=0.0, prefix_cache=100)
    expected = model(ids, images=images, targets=targets)
    for _ in range(2):  # filling the cache, then reading it
        assert torch.allclose(trainer.answer_loss(ids, images, targets), expected, atol=1e-5)
    assert (trainer.prefix_cache.hits, trainer.prefix_cache.misses) == (3, 3)
    shorter = ids[:, :8].clone()  # the same rows in a batch padded to another length hit the same entries
    assert torch.allclose(trainer.answer_loss(shorter[[0, 2]], images[[0, 2]], targets[[0, 2], :8]),
                          model(shorter[[0, 2]], images=images[[0, 2]], targets=targets[[0, 2], :8]), atol=1e-5)
    assert trainer.prefix_cache.misses == 3
    cache = PrefixCache(2)
    cache.states(model, ids, targets)
    assert len(cache.rows) == 2  # the oldest went


@pytest.mark.parametrize("fusion", ["cross-attention", "projector"])
def test_text_only_view_is_the_text_model_and_takes_the_fast_path(fusion: str) -> None:
    from camelid.variants.decode_step import refusal

    text = fuse(tiny_text())
    ids = torch.randint(0, text.config.vocab_size, (2, 20))  # room for the projector's 16 image tokens
    with torch.no_grad():
        expected = text(ids)
    model = tiny_vision(fusion, open_gates=True, fused=True)
    if fusion == "projector":
        with torch.no_grad():
            for p in model.projector.parameters():
                p.add_(torch.randn_like(p))
    names = [n for n, _ in model.named_parameters()]
    view = model.text_only()
    assert type(view) is Llama and all(type(b) is Block for b in view.layers) and view is model.text_only()
    assert refusal(view) is None  # the C++ decode step would take it (the vision model itself it refuses)
    assert refusal(model) is not None
    assert all(isinstance(b, BlockThenCrossAttention) for b in model.text.layers[1::2]) or fusion == "projector"
    assert [n for n, _ in model.named_parameters()] == names  # the view is not a submodule
    with torch.no_grad():
        assert torch.equal(view(ids), expected)
        assert torch.equal(view(ids), model(ids))  # no image set: the vision model is its text model
    with model.image(pixels(1)), torch.no_grad():
        assert not torch.equal(model(ids), expected)  # the view never sees the image
        assert torch.equal(view(ids), expected)


def test_scene_head_also_names_each_cells_place_in_the_grid() -> None:
    import math

    from camelid.vision.data import CELLS, COLOURS, SHAPES, SIZES, random_scene
    from camelid.vision.objective import SceneTrainer, cell_labels

    trainer = SceneTrainer(tiny_vision(), weight=1.0)
    scenes = [random_scene(np.random.default_rng(i)) for i in range(2)]
    cells = torch.tensor([cell_labels(s) for s in scenes])
    content = (math.log(len(COLOURS) + 1) + math.log(len(SHAPES) + 1) + math.log(len(SIZES) + 1)) / 3
    with torch.no_grad():
        trainer.scene_head.weight.zero_()
        trainer.scene_head.bias.zero_()  # every class alike: log(classes) per part
        assert math.isclose(float(trainer(None, pixels(2), None, pixels(2), cells)),
                            content + math.log(len(CELLS)) / 3, rel_tol=1e-5)
        high = 5.0  # "top left" for every cell: right for one cell of the nine, wrong by `high` for the others
        trainer.scene_head.bias[-len(CELLS)] = high
        where = (math.log(math.exp(high) + len(CELLS) - 1) * len(CELLS) - high) / len(CELLS)
        assert math.isclose(float(trainer(None, pixels(2), None, pixels(2), cells)), content + where / 3,
                            rel_tol=1e-5)
