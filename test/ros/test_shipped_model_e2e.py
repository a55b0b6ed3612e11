"""End to end through ROS topics with the shipped default model (issue: tiny GSVA).

An image with a red circle, a blue square and a green triangle; the command "the red circle,
the blue square and the purple star" → two present targets whose masks match the drawn shapes
(IoU ≥ 0.8) and one target absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gsva_ros.data.synth import Background, ObjectSpec, SceneSpec, render
from gsva_ros.model.config import GSVAConfig

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tiny"


def _scene() -> tuple[np.ndarray, list[np.ndarray]]:
    scene = SceneSpec(
        height=360,
        width=480,
        background=Background("solid", {"color": [200, 200, 190]}),
        objects=[
            ObjectSpec("circle", "red", "big", cx=150, cy=110, radius=55),
            ObjectSpec("square", "blue", "big", cx=330, cy=130, radius=60, angle=10),
            ObjectSpec("triangle", "green", "big", cx=240, cy=270, radius=60),
        ],
    )
    return render(scene)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


COMMAND = "the red circle, the blue square and the purple star"


@pytest.fixture(scope="module")
def answer(harness_factory, helpers):
    """The shipped model's answer, through real topics, and the drawn masks."""
    rgb, masks = _scene()
    h = harness_factory(model_dir=MODEL_DIR)
    image = h.publish_image(h.make_image(rgb))
    msg = h.ask(COMMAND)
    assert msg.error == ""
    assert helpers.same_header(msg.header, image.header)
    return msg, rgb, masks


def test_shipped_model_answers_through_ros(answer):
    msg, rgb, _ = answer
    phrases = ["the red circle", "the blue square", "the purple star"]
    assert [t.phrase for t in msg.targets] == phrases
    threshold = GSVAConfig.load(MODEL_DIR / "config.json").presence_threshold
    for t in msg.targets:
        # present needs the threshold; absent can also be a [SEG] whose mask came out empty
        assert 0.0 <= t.score <= 1.0 and (t.score >= threshold or not t.present)
        if t.present:
            assert (t.mask.height, t.mask.width, t.mask.encoding) == (*rgb.shape[:2], "mono8")
            labels = np.frombuffer(bytes(t.mask.data), np.uint8)
            assert len(t.objects) == (int(labels.max()) if labels.size else 0)
        else:
            assert (t.mask.height, t.mask.width, len(t.objects)) == (0, 0, 0)


def test_red_circle_blue_square_purple_star(answer):
    # the end-to-end target; measured: IoU 0.99 / 0.98, the purple star [REJ] (score
    # 0.37 against the 0.5 threshold). The model before the shipped one failed it (the star
    # answered [SEG] with a 35-px speck), so this can fail with a weaker model.
    msg, rgb, masks = answer
    assert [t.present for t in msg.targets] == [True, True, False]
    for target, truth in zip(msg.targets[:2], masks[:2], strict=True):
        assert (target.mask.height, target.mask.width) == rgb.shape[:2]
        pred = np.frombuffer(bytes(target.mask.data), np.uint8).reshape(rgb.shape[:2]) > 0
        assert _iou(pred, truth) >= 0.8, (target.phrase, _iou(pred, truth))
    absent = msg.targets[2]
    assert absent.mask.height == 0 and absent.mask.width == 0 and len(absent.objects) == 0
