"""The synthetic scene generator, question wording, scoring and patch labels (no model needed)."""

from __future__ import annotations

import random

import pytest

from llava_serve.default_model.data import (
    COLOURS,
    MAX_OVERLAP,
    MAX_SHAPES,
    MIN_FRACTION,
    SHAPES,
    Scene,
    Shape,
    _overlap,
    describe,
    max_fraction,
    position_of,
    positions_accepted,
    render,
    sample_scene,
)
from llava_serve.default_model.questions import (
    GENERATORS,
    KINDS,
    TEXT_ONLY_ANSWER,
    TEXT_ONLY_QUESTIONS,
    text_only_qa,
    varied_text_question,
)
from llava_serve.default_model.scoring import is_correct, stated_number, stated_position
from llava_serve.default_model.vision_aux import (
    N_COUNTS,
    VisionHeads,
    centre_labels,
    class_of,
    count_targets,
    density_targets,
    patch_labels,
)


def scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_scenes_are_reproducible_per_seed_and_differ_across_seeds() -> None:
    assert scenes(20, seed=3) == scenes(20, seed=3)
    assert scenes(20, seed=3) != scenes(20, seed=4)


def test_scenes_respect_counts_sizes_and_overlap() -> None:
    for scene in scenes(300):
        assert 1 <= len(scene.shapes) <= MAX_SHAPES
        short = min(scene.width, scene.height)
        for shape in scene.shapes:
            assert shape.kind in SHAPES and shape.colour in COLOURS
            side = shape.w * scene.width
            assert MIN_FRACTION * short - 1e-6 <= side <= max_fraction(len(scene.shapes)) * short + 1e-6
            x0, y0, x1, y1 = shape.box()
            assert x0 >= -1e-9 and y0 >= -1e-9 and x1 <= 1 + 1e-9 and y1 <= 1 + 1e-9
        for i, a in enumerate(scene.shapes):
            for b in scene.shapes[i + 1 :]:
                assert _overlap(a, b, scene.width, scene.height) <= MAX_OVERLAP


def test_all_shapes_colours_and_aspect_ratios_occur() -> None:
    drawn = scenes(400)
    assert {s.kind for sc in drawn for s in sc.shapes} == set(SHAPES)
    assert {s.colour for sc in drawn for s in sc.shapes} == set(COLOURS)
    assert any(sc.width > sc.height for sc in drawn) and any(sc.width < sc.height for sc in drawn)


@pytest.mark.parametrize("kind", SHAPES)
def test_render_paints_the_shape_colour_at_its_centre(kind: str) -> None:
    shape = Shape(kind, "blue", cx=0.5, cy=0.5, w=0.4, h=0.4)
    image = render(Scene(200, 200, (245, 245, 245), (shape,)))
    assert image.size == (200, 200)
    assert image.getpixel((100, 105)) == COLOURS["blue"]
    assert image.getpixel((5, 5)) == (245, 245, 245)


def test_position_and_description_text() -> None:
    left = Shape("circle", "red", cx=0.2, cy=0.5, w=0.2, h=0.2)
    top_right = Shape("star", "orange", cx=0.8, cy=0.2, w=0.2, h=0.2)
    assert position_of(left) == "left"
    assert position_of(top_right) == "top right"
    assert position_of(Shape("square", "blue", 0.5, 0.5, 0.3, 0.3)) == "center"
    assert describe(Scene(100, 100, (250, 250, 250), (top_right, left))) == "A red circle and an orange star."


def test_every_generated_answer_scores_as_correct() -> None:
    rng = random.Random(1)
    for scene in scenes(200, seed=1):
        for kind in KINDS:
            qa = GENERATORS[kind](scene, rng)
            if qa.kind in KINDS:
                assert is_correct(qa.kind, qa.answer, qa.target), qa


def test_scoring_parses_free_wording() -> None:
    assert is_correct("colour", "It is red.", "red")
    assert not is_correct("colour", "It is red and blue.", "red")
    assert is_correct("shape", "The red shape is a circle.", "circle")
    assert stated_number("There are 3 shapes.") == 3 and stated_number("There are two shapes.") == 2
    assert stated_position("It is in the upper left corner.") == "top left"
    assert stated_position("In the middle.") == "center"
    assert stated_position("I don't know.") == ""


def test_patch_labels_follow_the_padded_image() -> None:
    wide = Scene(200, 100, (250, 250, 250), (Shape("square", "green", cx=0.25, cy=0.5, w=0.4, h=0.8),))
    labels = patch_labels(wide, image_size=96, patch_size=16).view(6, 6)
    square = class_of("green", "square")
    # 200x100 padded to 200x200: the image fills rows 1.5-4.5 of 6; the square the left half of them.
    assert labels[2:4, 0:3].eq(square).all() and labels[0].eq(0).all() and labels[:, 4:].eq(0).all()
    centres = centre_labels(wide, image_size=96, patch_size=16).view(6, 6)
    assert centres.sum() == 1 and centres[3, 1] == 1


def test_count_targets_give_the_total_and_each_kind_and_colour() -> None:
    import torch

    squares = (Shape("square", "blue", 0.2, 0.5, 0.2, 0.2), Shape("square", "blue", 0.8, 0.5, 0.2, 0.2))
    scene = Scene(200, 200, (250, 250, 250), (*squares, Shape("circle", "red", 0.5, 0.2, 0.2, 0.2)))
    counts = count_targets(scene)
    assert counts.shape == (N_COUNTS,) and counts[0] == 3
    assert counts[1 + SHAPES.index("square")] == 2 and counts[1 + SHAPES.index("circle")] == 1
    assert counts[1 + len(SHAPES) + list(COLOURS).index("blue")] == 2 and counts[1 : 1 + len(SHAPES)].sum() == 3
    heads = VisionHeads(8)
    labels = torch.stack([patch_labels(scene, 96, 16)])
    features = torch.randn(1, 37, 8)
    out = heads.losses(features, labels, torch.zeros_like(labels), torch.zeros(1, 36), counts[None])
    assert out["count"].item() > 0 and 0 <= out["count_acc"].item() <= 1
    assert "count" not in heads.losses(features, labels, torch.zeros_like(labels), torch.zeros(1, 36))


def test_density_targets_sum_to_the_counts_around_each_centre() -> None:
    import torch

    squares = (Shape("square", "blue", 0.2, 0.5, 0.2, 0.2), Shape("square", "blue", 0.97, 0.5, 0.2, 0.2))
    scene = Scene(300, 150, (250, 250, 250), (*squares, Shape("circle", "red", 0.5, 0.2, 0.2, 0.2)))
    density = density_targets(scene, image_size=216, patch_size=24)
    assert density.shape == (81, N_COUNTS) and (density >= 0).all()
    torch.testing.assert_close(density.sum(0), count_targets(scene).float())  # also the one against the edge
    grid = density[:, 1 + SHAPES.index("circle")].view(9, 9)
    # 300x150 padded to 300x300: the circle's centre (0.5, 0.2) is at (x 0.5, y 0.35) of the square: row 3, col 4
    assert grid.argmax().item() == 3 * 9 + 4 and grid[3, 4] > 0.3 and grid[:, :2].sum() < 1e-3
    assert density[:, 1 + len(SHAPES) + list(COLOURS).index("green")].abs().sum() == 0
    heads = VisionHeads(8)
    labels = torch.stack([patch_labels(scene, 216, 24)])
    out = heads.losses(torch.randn(1, 82, 8), labels, torch.zeros_like(labels), torch.zeros(1, 81), None, density[None])
    assert out["density"].item() > 0 and out["density_acc"].item() in (0.0, 1.0) and "count" not in out
    out["density"].backward()
    assert heads.density.weight.grad is not None and heads.density.weight.grad.abs().sum() > 0


def test_the_vision_curriculum_starts_plain_and_ends_varied() -> None:
    from llava_serve.default_model import batches as b

    calls: list[bool] = []
    real = b.render

    def spy(scene, rng=None):
        calls.append(rng is None)
        return real(scene, rng)

    from unittest import mock

    from llava_serve.default_model.build import ModelSize, build_processor
    from llava_serve.default_model.tokenizer import build_tokenizer

    processor = build_processor(ModelSize(), build_tokenizer())
    with mock.patch.object(b, "render", spy):
        stream = b.image_batches(1, processor, ModelSize(), 8, easy_batches=4)
        for _ in range(5):
            batch = next(stream)
    assert len(batch) == 6 and batch[-2].shape == (8, N_COUNTS) and batch[-1].shape == (8, 36, N_COUNTS)
    assert all(calls[:8]) and not any(calls[-8:])  # batch 0 all plain, batch 4 none


def test_repeats_are_described_with_their_number_and_scored() -> None:
    squares = (Shape("square", "blue", 0.2, 0.5, 0.2, 0.2), Shape("square", "blue", 0.8, 0.5, 0.2, 0.2))
    scene = Scene(200, 200, (250, 250, 250), (*squares, Shape("circle", "red", 0.5, 0.2, 0.2, 0.2)))
    assert describe(scene) == "Two blue squares and a red circle."
    assert is_correct("describe", "Two blue squares and a red circle.", scene)
    assert not is_correct("describe", "A blue square and a red circle.", scene)
    rng = random.Random(0)
    counts = {GENERATORS["count"](scene, rng).answer for _ in range(60)}
    assert "There are three shapes." in counts and "There are two squares." in counts


def test_position_scoring_accepts_the_neighbouring_cell_only_near_a_grid_line() -> None:
    near = Shape("circle", "red", cx=0.35, cy=0.5, w=0.1, h=0.1)  # 0.017 right of the left third's line
    assert positions_accepted(near) == {"center", "left"}
    corner = Shape("circle", "red", cx=0.65, cy=0.31, w=0.1, h=0.1)
    assert positions_accepted(corner) == {"top", "top right", "center", "right"}
    assert positions_accepted(Shape("circle", "red", cx=0.5, cy=0.5, w=0.1, h=0.1)) == {"center"}
    assert is_correct("position", "It is on the left.", positions_accepted(near))
    assert not is_correct("position", "It is at the top.", positions_accepted(near))


def test_text_only_questions_get_the_fixed_answer() -> None:
    rng = random.Random(0)
    for _ in range(20):
        qa = text_only_qa(rng)
        assert qa.answer == TEXT_ONLY_ANSWER
    assert "picture" in TEXT_ONLY_ANSWER and "colour, shape, count or position" in TEXT_ONLY_ANSWER


def test_varied_text_only_questions_are_off_by_default_and_reworded_when_asked() -> None:
    plain, off = random.Random(4), random.Random(4)
    assert [text_only_qa(plain) for _ in range(50)] == [text_only_qa(off, 0.0) for _ in range(50)]
    rng = random.Random(5)
    varied = [text_only_qa(rng, 1.0) for _ in range(300)]
    assert all(qa.answer == TEXT_ONLY_ANSWER and qa.kind == "text" and qa.question.strip() for qa in varied)
    reworded = [qa.question for qa in varied if qa.question not in TEXT_ONLY_QUESTIONS]
    assert len(reworded) > 150
    assert any(q.lower().startswith(("hi, ", "hello, ", "hey, ")) for q in reworded)  # a greeting opens it
    assert any(q == q.lower() for q in reworded)
    rng = random.Random(6)
    assert all(isinstance(varied_text_question(rng), str) for _ in range(100))


def test_training_draws_varied_styles_and_up_to_six_shapes() -> None:
    drawn = scenes(600, seed=2)
    assert {len(s.shapes) for s in drawn} == set(range(1, MAX_SHAPES + 1))
    assert any(len({s.name for s in sc.shapes}) < len(sc.shapes) for sc in drawn)  # repeats
    rng = random.Random(3)
    corners = {render(sc, rng).getpixel((0, 0)) for sc in drawn[:60]}
    assert min(sum(c) for c in corners) < 240 and max(sum(c) for c in corners) > 600  # dark and light
