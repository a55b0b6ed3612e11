"""``gsva-ros make-bag``: moving-camera synthetic bags with truthful commands and ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("gsva_ros.msg", reason="interfaces not built: run `make setup`")

from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from gsva_ros.bag.io import BagReader, deserialize, stamp_ns  # noqa: E402
from gsva_ros.bag.messages import mask_from_msg  # noqa: E402
from gsva_ros.bag.samplebag import (  # noqa: E402
    COMMAND_TOPIC,
    FRAME_ID,
    GROUND_TRUTH_TOPIC,
    IMAGE_TOPIC,
    plan_sample,
)
from gsva_ros.cli.main import main  # noqa: E402
from gsva_ros.data.synth import (  # noqa: E402
    MIN_VISIBLE,
    polygon_area,
    sample_expressions,
    shape_polygon,
)
from gsva_ros.model.text import split_command  # noqa: E402
from gsva_ros.msg import Segmentation  # noqa: E402


def make_bag(tmp_path: Path, name: str, *args: str) -> tuple[int, Path]:
    out = tmp_path / name
    return main(["make-bag", "--out", str(out), "--no-progress", *args]), out


def read_bag(path: Path) -> dict[str, list]:
    types = {IMAGE_TOPIC: Image, COMMAND_TOPIC: String, GROUND_TRUTH_TOPIC: Segmentation}
    out: dict[str, list] = {t: [] for t in types}
    with BagReader(path) as bag:
        for m in bag.messages():
            out[m.topic].append((m.timestamp, deserialize(m.raw, types[m.topic])))
    return out


def test_plan_moves_objects_inside_the_square_and_keeps_expressions_true():
    plan = plan_sample(seconds=6.0, fps=5.0, seed=2)
    assert len(plan.segments) == 2 and 5 <= len(plan.commands) <= 6
    moved = 0
    previous = None
    for i in range(plan.n_frames):
        scene = plan.scene(i)
        image, masks = plan.render(i)
        ox, oy, side = scene.square
        for obj, mask in zip(scene.objects, masks, strict=True):
            assert ox <= obj.cx - obj.radius and obj.cx + obj.radius <= ox + side
            assert oy <= obj.cy - obj.radius and obj.cy + obj.radius <= oy + side
            assert mask.sum() >= MIN_VISIBLE * polygon_area(shape_polygon(obj))
        if previous is not None and plan.segment_of(i) is plan.segment_of(i - 1):
            moved += any(abs(a.cx - b.cx) + abs(a.cy - b.cy) > 0.5
                         for a, b in zip(scene.objects, previous.objects, strict=True))
        previous = scene
        # Independent truth check on every frame a command applies to.
        truth = {e.sentence: e.target_ids
                 for e in sample_expressions(scene, masks, np.random.default_rng(9), 10**6)}
        for cmd in plan.commands_at(i):
            for e in cmd.expressions:
                assert truth[e.sentence] == e.target_ids, (i, e.sentence)
    assert moved >= plan.n_frames // 2, "objects must drift between frames"
    for cmd in plan.commands:
        assert split_command(cmd.text) == [e.sentence for e in cmd.expressions]
        assert cmd.stamp_ns == plan.frame_stamp(cmd.frame) + round(0.5e9 / plan.fps)
    # A window runs to the next command's frame inclusive (continuous mode still applies the
    # old command there), except at a scene cut, and the last one to the end of the bag.
    for cmd, nxt in zip(plan.commands, plan.commands[1:], strict=False):
        same_scene = plan.segment_of(cmd.frame) is plan.segment_of(nxt.frame)
        assert cmd.window == range(cmd.frame, nxt.frame + 1 if same_scene else nxt.frame)
    assert plan.commands[-1].window == range(plan.commands[-1].frame, plan.n_frames)


def test_default_plan_has_every_case_and_separator():
    plan = plan_sample()  # the default 10 s at 10 fps, seed 0
    cases = {c for cmd in plan.commands for c in cmd.cases}
    assert cases == {"single", "multi", "no-target"}
    assert 8 <= len(plan.commands) <= 11
    assert any(", " in c.text for c in plan.commands) and any("; " in c.text
                                                                 for c in plan.commands)
    assert any(len(c.expressions) > 1 for c in plan.commands)


def test_make_bag_writes_the_documented_topics(tmp_path, capsys):
    code, out = make_bag(tmp_path, "bag", "--seconds", "3", "--fps", "5", "--seed", "1",
                         "--storage", "sqlite3")
    assert code == 0
    assert "commands" in capsys.readouterr().out
    with BagReader(out) as bag:
        assert bag.storage == "sqlite3"
        assert {t: i.msgtype for t, i in bag.topics.items()} == {
            IMAGE_TOPIC: "sensor_msgs/msg/Image",
            COMMAND_TOPIC: "std_msgs/msg/String",
            GROUND_TRUTH_TOPIC: "gsva_ros/msg/Segmentation",
        }
    msgs = read_bag(out)
    images, commands, truths = msgs[IMAGE_TOPIC], msgs[COMMAND_TOPIC], msgs[GROUND_TRUTH_TOPIC]
    assert len(images) == 15 and len(commands) == 3
    for ts, img in images:
        assert img.encoding == "rgb8" and img.header.frame_id == FRAME_ID
        assert stamp_ns(img.header) == ts and (img.width, img.height) == (320, 240)
    image_stamps = {ts for ts, _ in images}
    texts = {c.data for _, c in commands}
    for cmd_ts, cmd in commands:
        # Each command has ground truth for the frame it is timed with: the latest before it.
        frame_ts = max(t for t in image_stamps if t <= cmd_ts)
        gt = [g for _, g in truths if g.command == cmd.data and stamp_ns(g.header) == frame_ts]
        assert len(gt) == 1
        assert [t.phrase for t in gt[0].targets] == split_command(cmd.data)
    for _, gt in truths:
        assert stamp_ns(gt.header) in image_stamps and gt.command in texts
        for t in gt.targets:
            mask = mask_from_msg(t.mask)
            if not t.present:
                assert mask is None and not t.objects
                continue
            assert mask.shape == (240, 320) and t.mask.encoding == "mono8"
            assert set(np.unique(mask)) == set(range(len(t.objects) + 1))
            for k, roi in enumerate(t.objects, start=1):
                ys, xs = np.nonzero(mask == k)
                assert (roi.x_offset, roi.y_offset) == (xs.min(), ys.min())


def test_make_bag_is_deterministic_and_refuses_to_overwrite(tmp_path, capsys):
    code_a, a = make_bag(tmp_path, "a", "--seconds", "1.5", "--fps", "4", "--seed", "5")
    code_b, b = make_bag(tmp_path, "b", "--seconds", "1.5", "--fps", "4", "--seed", "5")
    assert code_a == code_b == 0
    with BagReader(a) as bag:
        assert bag.storage == "mcap"  # the default
    assert read_bag(a) == read_bag(b)
    before = sorted(p.name for p in a.iterdir())
    code, _ = make_bag(tmp_path, "a", "--seconds", "1", "--seed", "6")
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in a.iterdir()) == before
