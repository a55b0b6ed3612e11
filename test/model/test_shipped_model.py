"""The shipped tiny GSVA (models/tiny): loads by default, and its accuracy on a fresh split.

A small split from a seed never used in training (train: seed 1; the README's test split:
seed 99). Two levels: a regression floor the shipped model must keep (it catches a broken or
untrained model: a random model rejects nearly everything, T-acc ≈ 0), and the issue's targets,
which the shipped model does not reach yet (strict xfail, so reaching them is noticed). The full
evaluation is `gsva-ros eval` (README).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gsva_ros.data.grefcoco import load_grefcoco
from gsva_ros.data.synth import generate_dataset
from gsva_ros.engine import GSVAEngine, resolve_model_dir
from gsva_ros.evaluation import evaluate

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tiny"


@pytest.fixture(scope="module")
def engine():
    return GSVAEngine("tiny", device="cpu")


@pytest.fixture(scope="module")
def fresh_samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh") / "data"
    generate_dataset(root, n=30, seed=20261129, split="test", progress=False)
    return load_grefcoco(root, split="test")


@pytest.fixture(scope="module")
def fresh_summary(engine, fresh_samples):
    summary, _ = evaluate(engine, fresh_samples, protocol="strict", progress=False)
    assert summary["count"] == len(fresh_samples) > 60
    return summary


@pytest.fixture(scope="module")
def written_answers(fresh_samples):
    """``generate`` as the model writes it (no phrase check) → (summary, run statistics)."""
    engine = GSVAEngine("tiny", device="cpu", check_generated_phrases=False)
    return evaluate(engine, fresh_samples, decoding="generate", progress=False)


def test_tiny_is_the_shipped_default(engine):
    assert resolve_model_dir("tiny") == MODEL_DIR
    assert engine.config.name == "tiny"
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) < 30 * 2**20


def test_shipped_model_regression_floor(fresh_summary):
    s = fresh_summary
    # measured for the shipped model on this split: gIoU 0.78, cIoU 0.83, N-acc 0.75, T-acc
    # 0.96, single 0.79, multi 0.79 (103 expressions, so the floors leave room for noise; the
    # previous model: 0.75, 0.75, 0.71, 0.95, 0.74, 0.79)
    assert s["giou"] >= 0.65 and s["ciou"] >= 0.65, s
    assert s["t_acc"] >= 0.85 and s["n_acc"] >= 0.55, s
    assert s["per_case"]["single"]["giou"] >= 0.65, s
    assert s["per_case"]["multi"]["giou"] >= 0.65, s


def _four_red_shapes():
    from gsva_ros.data.synth import Background, ObjectSpec, SceneSpec, render

    shapes = ["circle", "square", "star", "triangle"]
    centres = [(120, 110), (340, 110), (140, 260), (340, 260)]
    scene = SceneSpec(
        height=360, width=480, background=Background("solid", {"color": [200, 200, 190]}),
        objects=[ObjectSpec(s, "red", "big", cx=x, cy=y, radius=58)
                 for s, (x, y) in zip(shapes, centres, strict=True)],
    )
    rgb, masks = render(scene)
    return shapes, rgb, masks


def _check_shapes(engine, rgb, masks, shapes, command, checked):
    result = engine.segment(rgb, command)  # once per command, every checked shape in it
    for shape in checked:
        target = next(t for t in result.targets if shape in t.phrase)
        assert target.present, (command, shape)
        ious = [float((target.binary_mask & m).sum() / (target.binary_mask | m).sum())
                for m in masks]
        want = shapes.index(shape)
        assert ious[want] >= 0.6, (command, shape, ious)
        assert all(iou < 0.3 for i, iou in enumerate(ious) if i != want), (command, shape, ious)


def test_shipped_model_tells_shapes_of_one_colour_apart(engine):
    """Four red shapes: only the shape word says which is meant. The model before the
    convolutional SAM stem found the star by nothing (IoU 0.01 for "the star" here, 0.06 for
    "the red star"); the shipped one: 0.88 and 0.89 (in the four-phrase command: circle 0.97,
    star 0.90; square and triangle, not checked, 0.70 and 0.58)."""
    shapes, rgb, masks = _four_red_shapes()
    for command, checked in (
        ("the red circle, the red square, the red star and the red triangle", ("circle", "star")),
        ("the red star", ("star",)),
        ("the star", ("star",)),
    ):
        _check_shapes(engine, rgb, masks, shapes, command, checked)


@pytest.mark.xfail(strict=True, reason="the shipped model answers the star and the triangle "
                   "absent in this bare four-phrase command (its masks keep nothing), though it "
                   "finds each alone and with 'red'; the model before it found them (README)")
def test_shipped_model_finds_bare_shape_words_in_a_long_command(engine):
    shapes, rgb, masks = _four_red_shapes()
    _check_shapes(engine, rgb, masks, shapes,
                  "the circle, the square, the star and the triangle", ("circle", "star"))


def test_shipped_model_writes_the_phrases_it_is_asked(engine, fresh_samples, written_answers):
    # the model trained on 5-expression conversations only mis-copied 14 of these 30
    # conversations and its answer as written scored gIoU 0.63; the one after it: 0 and 0.75;
    # the shipped one: 2 and 0.78
    _, stats = evaluate(engine, fresh_samples, decoding="generate", progress=False)
    assert stats["conversations"] == 30 and stats["miscopied"] <= 3, stats
    summary, stats = written_answers
    assert stats["fallbacks"] <= 3, stats  # only a wrong slot count falls back here
    assert summary["giou"] >= 0.65 and summary["t_acc"] >= 0.85, summary


@pytest.mark.xfail(strict=True, reason="the shipped tiny model is below the issue's target for "
                   "generate decoding (gIoU >= 0.85); see README 'The embedded model'")
def test_shipped_model_meets_the_generate_target(written_answers):
    assert written_answers[0]["giou"] >= 0.85, written_answers[0]


@pytest.mark.xfail(strict=True, reason="the shipped tiny model is below the issue's targets "
                   "(gIoU/cIoU >= 0.90, N-acc/T-acc >= 0.97); see README 'The embedded model'")
def test_shipped_model_meets_the_targets(fresh_summary):
    s = fresh_summary
    assert s["giou"] >= 0.90 and s["ciou"] >= 0.90, s
    assert s["n_acc"] >= 0.97 and s["t_acc"] >= 0.97, s
