"""Generated scenes: the held-out combinations never reach training, every held-out question is about one."""

from __future__ import annotations

import numpy as np

from camelid.vision.data import (
    COLOURS,
    HELD_OUT,
    KINDS,
    SHAPES,
    Scene,
    Shape,
    ask,
    heldout_set,
    random_scene,
    seen_set,
    training_example,
)


def test_training_scenes_never_hold_an_unseen_pair_and_cover_the_rest() -> None:
    rng = np.random.default_rng(0)
    pairs, kinds = set(), set()
    for _ in range(3000):
        scene, q = training_example(rng)
        colours, shapes = [s.colour for s in scene.shapes], [s.shape for s in scene.shapes]
        assert 1 <= len(scene.shapes) <= 3 and len(set(colours)) == len(colours) and len(set(shapes)) == len(shapes)
        assert len({s.cell for s in scene.shapes}) == len(scene.shapes)
        pairs |= {(s.colour, s.shape) for s in scene.shapes}
        kinds.add(q.kind)
    assert not pairs & HELD_OUT
    assert pairs == {(c, s) for c in COLOURS for s in SHAPES} - HELD_OUT  # every other pair is seen
    assert kinds == set(KINDS)
    # each colour and each shape still appears in training, only not in its held-out pairs
    assert {c for c, _ in HELD_OUT} <= {c for c, _ in pairs} and {s for _, s in HELD_OUT} <= {s for _, s in pairs}


def test_heldout_questions_are_about_the_unseen_pair() -> None:
    held = heldout_set(120)
    assert held == heldout_set(120)  # the same questions in every run
    assert [q.kind for _, q in held[:6]] == list(KINDS)
    for scene, q in held:
        target = scene.shapes[0]
        assert (target.colour, target.shape) in HELD_OUT
        assert sum((s.colour, s.shape) in HELD_OUT for s in scene.shapes) == 1
        if q.kind in ("colour", "shape", "size", "position"):
            assert q == ask(scene, q.kind, target)
        if q.kind == "caption":
            assert f"{target.colour} {target.shape}" in q.answer
    assert not {(s.colour, s.shape) for scene, _ in seen_set(300) for s in scene.shapes} & HELD_OUT


def test_questions_answers_and_captions() -> None:
    scene = Scene((Shape("orange", "square", "large", 8, 0, 0), Shape("red", "circle", "small", 0, 0, 0)))
    assert ask(scene, "colour", scene.shapes[0]).question == "What colour is the square?"
    assert ask(scene, "colour", scene.shapes[0]).answer == "orange"
    assert ask(scene, "shape", scene.shapes[1]).answer == "circle"
    assert ask(scene, "position", scene.shapes[0]).answer == "bottom right"
    assert ask(scene, "count", scene.shapes[0]).answer == "two"
    assert ask(scene, "caption", scene.shapes[0]).answer == "a red circle and an orange square"  # reading order


def test_rendering_is_deterministic_and_draws_the_colours() -> None:
    a = random_scene(np.random.default_rng(7))
    b = random_scene(np.random.default_rng(7))
    assert a == b and a.render().tobytes() == b.render().tobytes()
    scene = Scene((Shape("blue", "square", "large", 4, 0, 0),))
    pixels = np.asarray(scene.render(48))
    assert pixels.shape == (48, 48, 3)
    assert tuple(pixels[24, 24]) == COLOURS["blue"]  # the centre cell's middle
    assert tuple(pixels[2, 2]) == (16, 16, 16)  # background
