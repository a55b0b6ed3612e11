"""``gsva-ros demo`` (``make demo``): node + sample bag over ROS topics → answers and PNGs."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("gsva_ros.msg", reason="interfaces not built: run `make setup`")

from gsva_ros.bag.io import BagReader  # noqa: E402
from gsva_ros.cli import demo  # noqa: E402
from gsva_ros.cli.main import main  # noqa: E402


def test_demo_runs_the_node_on_a_sample_bag_and_writes_pngs(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "demo"
    out_dir.mkdir()
    (out_dir / "command_99.png").write_bytes(b"stale")  # from an earlier, longer run
    code = main(["demo", "--model", str(tiny_model_dir), "--out-dir", str(out_dir),
                 "--seconds", "2.5", "--fps", "5", "--device", "cpu", "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    with BagReader(out_dir / "sample_bag") as bag:
        n_commands = bag.topics["/gsva/command"].count
    with BagReader(out_dir / "replay_bag") as bag:
        assert bag.topics["/gsva/segmentation"].count == n_commands
    pngs = sorted(p.name for p in out_dir.glob("command_*.png"))
    assert pngs == [f"command_{i:02d}.png" for i in range(n_commands)]
    for i in range(n_commands):
        assert f"command {i}: " in stdout
    assert "score" in stdout and ("present" in stdout or "absent" in stdout)
    assert "gIoU" in stdout and "answers" in stdout  # summary and metrics vs ground truth
    import cv2

    image = cv2.imread(str(out_dir / pngs[0]))
    assert image is not None and image.shape[1] >= 320 and image.shape[0] > 240


def test_demo_without_a_model_says_how_to_pass_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GSVA_ROS_MODELS", str(tmp_path))  # no "tiny" in there
    code = main(["demo", "--model", "no_such_model", "--out-dir", str(tmp_path / "d")])
    assert code == 2
    assert "--model DIR" in capsys.readouterr().err


def test_demo_keeps_dds_local_and_private(monkeypatch):
    monkeypatch.delenv("ROS_AUTOMATIC_DISCOVERY_RANGE", raising=False)
    monkeypatch.delenv("ROS_DOMAIN_ID", raising=False)
    demo._ros_environment()
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    assert 1 <= int(os.environ["ROS_DOMAIN_ID"]) <= 101
    monkeypatch.setenv("ROS_DOMAIN_ID", "42")
    demo._ros_environment()
    assert os.environ["ROS_DOMAIN_ID"] == "42"  # a domain chosen by the user is kept
