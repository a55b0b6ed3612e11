"""``gsva-ros replay`` and the bag layer: storages, lockstep semantics, metrics, failures.

Bags are tiny (3 s at 5 fps, three commands) and the model is the session's random tiny GSVA,
so these tests check behaviour and exact agreement with an independent computation, never
accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("gsva_ros.msg", reason="interfaces not built: run `make setup`")

from sensor_msgs.msg import Image, RegionOfInterest  # noqa: E402
from std_msgs.msg import Header, String  # noqa: E402

from gsva_ros.bag.io import (  # noqa: E402
    STORAGES,
    BagError,
    BagReader,
    BagWriter,
    deserialize,
    set_stamp,
    stamp_ns,
)
from gsva_ros.bag.samplebag import (  # noqa: E402
    COMMAND_TOPIC,
    GROUND_TRUTH_TOPIC,
    IMAGE_TOPIC,
    ground_truth_targets,
    plan_sample,
    write_sample_bag,
)
from gsva_ros.cli.main import main  # noqa: E402
from gsva_ros.msg import Segmentation, Target  # noqa: E402
from gsva_ros.ros.conversions import mask_to_msg, rgb_to_msg  # noqa: E402

SECONDS, FPS, SEED = 3.0, 5.0, 0  # three commands covering single, multi and no-target
SEG_TOPIC = "/gsva/segmentation"
T0 = 1_000 * 1_000_000_000


@pytest.fixture(scope="module")
def sample_plan():
    return plan_sample(SECONDS, FPS, SEED)


@pytest.fixture(scope="module")
def sample_bag(sample_plan, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("replay") / "sample"
    write_sample_bag(sample_plan, out, "mcap", progress=False)
    return out


def replay_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["replay", "--no-progress", "--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_all(path: Path, topics=None) -> list:
    with BagReader(path) as bag:
        return list(bag.messages(topics))


def image_msg(stamp: int, seed: int = 0, size=(48, 64)) -> Image:
    rgb = np.random.default_rng(seed).integers(0, 255, (*size, 3), np.uint8)
    header = Header(frame_id="camera")
    set_stamp(header, stamp)
    return rgb_to_msg(rgb, header)


def write_bag(path: Path, messages: list[tuple[str, str, int, object]], storage="mcap",
              extra_types: dict | None = None) -> Path:
    """Write ``(topic, type, timestamp, rclpy message or raw bytes)`` in the given order."""
    with BagWriter(path, storage) as bag:
        for topic, msgtype, _, _ in messages:
            if not bag.has_topic(topic):
                msgdef, rihs = (extra_types or {}).get(msgtype, (None, None))
                bag.add_topic(topic, msgtype, msgdef, rihs)
        for topic, _, ts, msg in messages:
            if isinstance(msg, bytes):
                bag.write(topic, ts, msg)
            else:
                bag.write_msg(topic, ts, msg)
    return path


# ----------------------------------------------------------------------------------- bag layer
@pytest.mark.parametrize("storage", STORAGES)
def test_messages_round_trip_in_both_storages(tmp_path, storage):
    image = image_msg(T0 + 5, seed=1)
    labels = np.zeros((48, 64), np.uint8)
    labels[10:20, 5:25] = 1
    seg = Segmentation(command="the mug; the cat", response="Sure", error="", latency_ms=12.5)
    seg.header = image.header
    seg.targets = [
        Target(phrase="the mug", present=True, score=0.75, mask=mask_to_msg(labels, image.header),
               objects=[RegionOfInterest(x_offset=5, y_offset=10, width=20, height=10)]),
        Target(phrase="the cat", present=False, score=0.5, mask=Image(encoding="mono8")),
    ]
    written = [(IMAGE_TOPIC, "sensor_msgs/msg/Image", T0, image),
               (COMMAND_TOPIC, "std_msgs/msg/String", T0 + 1, String(data="the mug; the cat")),
               (SEG_TOPIC, "gsva_ros/msg/Segmentation", T0 + 2, seg)]
    out = write_bag(tmp_path / "bag", written, storage)
    assert not list(tmp_path.glob(".*")), "no temporary directory may be left behind"
    with BagReader(out) as bag:
        assert bag.storage == storage
        assert {t: i.msgtype for t, i in bag.topics.items()} == {
            IMAGE_TOPIC: "sensor_msgs/msg/Image", COMMAND_TOPIC: "std_msgs/msg/String",
            SEG_TOPIC: "gsva_ros/msg/Segmentation"}
        got = list(bag.messages())
    assert [(m.topic, m.timestamp) for m in got] == [(t, ts) for t, _, ts, _ in written]
    for m, (_, msgtype, _, msg) in zip(got, written, strict=True):
        assert deserialize(m.raw, msgtype) == msg
    # A single storage file can be read without its directory too.
    data_file = next(p for p in out.iterdir() if p.suffix in (".mcap", ".db3"))
    assert len(read_all(data_file)) == 3


def test_our_type_hashes_equal_the_built_interfaces():
    import sys

    from gsva_ros.bag.typestore import definition

    for name in ("Segmentation", "Target"):
        _, rihs = definition(f"gsva_ros/msg/{name}")
        built = Path(sys.prefix) / "share" / "gsva_ros" / "msg" / f"{name}.json"
        if not built.is_file():
            pytest.skip("interfaces not installed in this prefix")
        hashes = {h["type_name"]: h["hash_string"]
                  for h in json.loads(built.read_text())["type_hashes"]}
        assert hashes[f"gsva_ros/msg/{name}"] == rihs


def test_writer_never_replaces_what_is_not_a_bag(tmp_path):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "important.txt").write_text("x")
    with pytest.raises(BagError, match="already exists"):
        BagWriter(keep, "mcap")
    with pytest.raises(BagError, match="not a rosbag2 bag"):
        BagWriter(keep, "mcap", overwrite=True)
    assert (keep / "important.txt").read_text() == "x"


# ------------------------------------------------------------------------------ lockstep replay
def test_replay_metrics_equal_an_independent_gres_computation(
    sample_plan, sample_bag, tiny_model_dir, tmp_path, capsys
):
    """Lockstep answers each command on its frame; metrics equal GRESMetrics over the same
    frames, commands and ground truth computed here without any bag (lenient protocol, so the
    forced masks of the random model's rejections are scored too)."""
    from gsva_ros.engine import GSVAEngine
    from gsva_ros.metrics import GRESMetrics

    out = tmp_path / "out"
    code, stdout, _ = replay_cli(capsys, "--bag", str(sample_bag), "--out", str(out),
                                 "--model", str(tiny_model_dir), "--protocol", "lenient",
                                 "--json")
    assert code == 0, stdout
    assert "protocol: lenient" in stdout and "gIoU" in stdout  # eval's table
    got = json.loads(stdout.strip().splitlines()[-1])
    assert list(got)[:4] == ["giou", "ciou", "n_acc", "t_acc"] and list(got)[-1] == "count"

    engine = GSVAEngine(str(tiny_model_dir), device="cpu")
    expected = GRESMetrics("lenient")
    for cmd in sample_plan.commands:
        image, masks = sample_plan.render(cmd.frame)
        result = engine.segment(image, cmd.text, masks_for_rejected=True)
        truth = ground_truth_targets(cmd.expressions, masks)
        for t, gt, expr in zip(result.targets, truth, cmd.expressions, strict=True):
            gt_mask = gt.mask if gt.present else np.zeros(image.shape[:2], np.uint8)
            pred = t.binary_mask if t.present else t.forced_mask
            expected.add(t.present, pred, gt_mask, expr.case)
    want = expected.summary()
    for key in ("giou", "ciou", "n_acc", "t_acc", "per_case", "count"):
        assert got[key] == want[key], key
    assert got["commands"] == got["answered"] == len(sample_plan.commands)

    # Output: inputs copied, one answer per command at the command's timestamp, stamped with
    # the header of the frame it was timed with.
    with BagReader(sample_bag) as bag:
        counts_in = {t: i.count for t, i in bag.topics.items()}
    with BagReader(out) as bag:
        counts_out = {t: i.count for t, i in bag.topics.items()}
        answers = list(bag.messages([SEG_TOPIC]))
    assert counts_out == {**counts_in, SEG_TOPIC: len(sample_plan.commands)}
    for m, cmd in zip(answers, sample_plan.commands, strict=True):
        msg = deserialize(m.raw, Segmentation)
        assert m.timestamp == cmd.stamp_ns
        assert stamp_ns(msg.header) == sample_plan.frame_stamp(cmd.frame)
        assert msg.header.frame_id == "camera" and msg.command == cmd.text and not msg.error


def test_bag_without_ground_truth_unknown_topics_and_node_rules(tiny_model_dir, tmp_path,
                                                                capsys):
    """No ground truth → answers but no metrics; an unknown type is copied byte for byte; the
    node's rules: no image yet, invalid command, max_image_age_s, continuous mode."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.EMPTY)
    store.register(get_types_from_msg("string note\nuint8[] blob", "my_pkg/msg/Blob"))
    blob_cls = store.types["my_pkg/msg/Blob"]
    blob = bytes(store.serialize_cdr(blob_cls(note="hi", blob=np.arange(5, dtype=np.uint8)),
                                     "my_pkg/msg/Blob"))
    blob_def = (store.generate_msgdef("my_pkg/msg/Blob", ros_version=2)[0],
                store.hash_rihs01("my_pkg/msg/Blob"))
    s = 1_000_000_000
    bag = write_bag(tmp_path / "in", [
        (COMMAND_TOPIC, "std_msgs/msg/String", T0, String(data="the red circle")),  # no image
        ("/robot/blob", "my_pkg/msg/Blob", T0 + 1, blob),
        # Same timestamp, command written first: "at or before" still picks this image.
        (COMMAND_TOPIC, "std_msgs/msg/String", T0 + s, String(data="the red circle")),
        (IMAGE_TOPIC, "sensor_msgs/msg/Image", T0 + s, image_msg(T0 + s, 1)),
        (COMMAND_TOPIC, "std_msgs/msg/String", T0 + s + 1, String(data=" , ")),  # invalid
        (IMAGE_TOPIC, "sensor_msgs/msg/Image", T0 + 2 * s, image_msg(T0 + s, 2)),  # old stamp
        (COMMAND_TOPIC, "std_msgs/msg/String", T0 + 2 * s + 1, String(data="the knife")),
        ("/robot/blob", "my_pkg/msg/Blob", T0 + 3 * s, blob),
    ], "sqlite3", extra_types={"my_pkg/msg/Blob": blob_def})

    out = tmp_path / "out"
    code, stdout, _ = replay_cli(capsys, "--bag", str(bag), "--out", str(out), "--model",
                                 str(tiny_model_dir), "--max-image-age-s", "0.5", "--json")
    assert code == 0, stdout
    assert "gIoU" not in stdout and "none (no metrics)" in stdout
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["count"] == 0 and summary["giou"] is None and summary["commands"] == 4
    answers = [deserialize(m.raw, Segmentation) for m in read_all(out, [SEG_TOPIC])]
    assert [a.command for a in answers] == ["the red circle", "the red circle", " , ",
                                            "the knife"]
    assert answers[0].error == f"no image received on {IMAGE_TOPIC} yet"
    assert answers[1].error == "" and len(answers[1].targets) == 1
    assert stamp_ns(answers[1].header) == T0 + s
    assert answers[2].error and not answers[2].targets  # the splitter's CommandError text
    assert answers[3].error.startswith("image is too old (1.00 s > max_image_age_s 0.5 s)")
    blobs = read_all(out, ["/robot/blob"])
    assert [m.raw for m in blobs] == [blob, blob]
    assert blobs[0].msgtype == "my_pkg/msg/Blob"
    assert blobs[0].connection.msgdef.data == blob_def[0]

    # continuous, no rate limit: the standing command is applied to every newer frame; the
    # invalid command ends it, so only the frame after "the red circle" … is answered anew.
    out2 = tmp_path / "out2"
    code, stdout, _ = replay_cli(capsys, "--bag", str(bag), "--out", str(out2), "--model",
                                 str(tiny_model_dir), "--mode", "continuous",
                                 "--max-rate-hz", "0", "--storage", "mcap")
    assert code == 0, stdout
    answers = [deserialize(m.raw, Segmentation) for m in read_all(out2, [SEG_TOPIC])]
    # "the red circle" (no image), "the red circle" on frame 1, " , " (ends the standing
    # command), "the knife" on frame 2 → standing "the knife", but no newer frame follows.
    assert [a.command for a in answers] == ["the red circle", "the red circle", " , ",
                                            "the knife"]
    with BagReader(out2) as b:
        assert b.storage == "mcap"


def test_continuous_mode_answers_new_frames_at_the_rate_limit(tiny_model_dir, tmp_path,
                                                              capsys):
    ms = 1_000_000
    frames = [(IMAGE_TOPIC, "sensor_msgs/msg/Image", T0 + i * 100 * ms,
               image_msg(T0 + i * 100 * ms, i)) for i in range(8)]
    cmd = [(COMMAND_TOPIC, "std_msgs/msg/String", T0 + 50 * ms, String(data="the red circle"))]
    bag = write_bag(tmp_path / "in", sorted(frames + cmd, key=lambda m: m[2]))
    out = tmp_path / "out"
    code, stdout, _ = replay_cli(capsys, "--bag", str(bag), "--out", str(out), "--model",
                                 str(tiny_model_dir), "--mode", "continuous",
                                 "--max-rate-hz", "4")
    assert code == 0, stdout
    got = [(m.timestamp - T0, stamp_ns(deserialize(m.raw, Segmentation).header) - T0)
           for m in read_all(out, [SEG_TOPIC])]
    # command at 50 ms on frame 0; then every 250 ms of bag time the newest frame.
    assert got == [(50 * ms, 0), (300 * ms, 300 * ms), (550 * ms, 500 * ms),
                   (800 * ms, 700 * ms)]


def test_bag_without_commands_copies_the_inputs(tmp_path, capsys):
    bag = write_bag(tmp_path / "in", [
        (IMAGE_TOPIC, "sensor_msgs/msg/Image", T0 + i, image_msg(T0 + i, i)) for i in range(3)
    ])
    out = tmp_path / "out"
    code, stdout, stderr = replay_cli(capsys, "--bag", str(bag), "--out", str(out),
                                      "--model", str(tmp_path / "no_model_needed"))
    assert code == 0, stdout + stderr
    assert f"no commands on {COMMAND_TOPIC}" in stdout
    with BagReader(out) as b:
        assert {t: i.count for t, i in b.topics.items()} == {IMAGE_TOPIC: 3}


def corrupt(bag: Path, how: str) -> None:
    data = next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))
    raw = data.read_bytes()
    if how == "truncated":
        data.write_bytes(raw[: len(raw) // 2])
    else:
        data.write_bytes(b"\x00garbage" * 1000)


@pytest.mark.parametrize(("storage", "how"), [("mcap", "truncated"), ("sqlite3", "garbage"),
                                              ("mcap", "garbage")])
def test_corrupt_bag_fails_clearly_and_writes_nothing(tmp_path, capsys, storage, how):
    bag = tmp_path / "in"
    write_sample_bag(plan_sample(1.0, 5.0, SEED), bag, storage, progress=False)
    corrupt(bag, how)
    out = tmp_path / "out"
    code, stdout, stderr = replay_cli(capsys, "--bag", str(bag), "--out", str(out),
                                      "--model", "/nonexistent")
    assert code != 0
    assert f"cannot read bag {bag}" in stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no partial output


def test_clear_errors_for_missing_bag_topic_and_existing_output(sample_bag, tmp_path, capsys):
    code, _, stderr = replay_cli(capsys, "--bag", str(tmp_path / "nope"), "--out",
                                 str(tmp_path / "o"))
    assert code == 2 and "does not exist" in stderr
    code, _, stderr = replay_cli(capsys, "--bag", str(sample_bag), "--out", str(tmp_path / "o"),
                                 "--image-topic", "/other/image")
    assert code == 2 and "/other/image is not in the bag" in stderr and IMAGE_TOPIC in stderr
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("x")
    code, _, stderr = replay_cli(capsys, "--bag", str(sample_bag), "--out",
                                 str(tmp_path / "exists"))
    assert code == 2 and "already exists" in stderr
    assert not (tmp_path / "o").exists()


def test_cli_defaults_mirror_the_node_parameters():
    from gsva_ros.bag import replay as bag_replay
    from gsva_ros.cli import replay as cli_replay
    from gsva_ros.ros.node import PARAMETERS

    for mod in (bag_replay, cli_replay):
        assert mod.DEFAULT_MODE == PARAMETERS["mode"].default
        assert mod.DEFAULT_MAX_RATE_HZ == PARAMETERS["max_rate_hz"].default
        assert mod.DEFAULT_MAX_IMAGE_AGE_S == PARAMETERS["max_image_age_s"].default
    assert bag_replay.ReplayOptions().presence_threshold == PARAMETERS["presence_threshold"].default


def test_presence_threshold_reaches_the_engine_and_bad_values_exit_2(sample_bag, tiny_model_dir,
                                                                      tmp_path, capsys):
    out = tmp_path / "strict"
    code, stdout, _ = replay_cli(capsys, "--bag", str(sample_bag), "--out", str(out), "--model",
                                 str(tiny_model_dir), "--presence-threshold", "0.999")
    assert code == 0, stdout
    answers = [deserialize(m.raw, Segmentation) for m in read_all(out, [SEG_TOPIC])]
    targets = [t for a in answers for t in a.targets]
    assert targets and not any(t.present for t in targets)  # no [SEG] share reaches 0.999
    with pytest.raises(SystemExit) as info:
        replay_cli(capsys, "--bag", str(sample_bag), "--out", str(tmp_path / "x"),
                   "--presence-threshold", "1")
    assert info.value.code == 2 and not (tmp_path / "x").exists()
    assert "--presence-threshold: must be in [0, 0.999]" in capsys.readouterr().err


@pytest.fixture
def masks_find_nothing(monkeypatch):
    """Every mask the model decodes is empty (lockstep and realtime run in this process)."""
    from gsva_ros.model.gsva import GSVAModel

    real = GSVAModel.decode_masks

    def nothing(self, *args, **kwargs):
        return real(self, *args, **kwargs) * 0.0 - 10.0

    monkeypatch.setattr(GSVAModel, "decode_masks", nothing)


@pytest.mark.parametrize("keep", [False, True])
def test_keep_empty_masks_reaches_the_engine(sample_bag, tiny_model_dir, tmp_path, capsys,
                                             masks_find_nothing, keep):
    out = tmp_path / "o"
    flags = ["--presence-threshold", "0.001"] + (["--keep-empty-masks"] if keep else [])
    code, stdout, _ = replay_cli(capsys, "--bag", str(sample_bag), "--out", str(out), "--model",
                                 str(tiny_model_dir), *flags)
    assert code == 0, stdout
    answers = [deserialize(m.raw, Segmentation) for m in read_all(out, [SEG_TOPIC])]
    answered = [a for a in answers if not a.error]
    assert answered and all(a.targets for a in answered)
    for a in answered:  # every slot answered [SEG] (threshold 0.001), every mask is empty
        assert all(t.present == keep for t in a.targets)
        assert (a.note == "") == keep and (keep or "reported absent" in a.note)


# ------------------------------------------------------------------------------ realtime replay
def test_realtime_replay_through_the_real_node(sample_plan, sample_bag, tiny_model_dir,
                                               tmp_path, capsys):
    out = tmp_path / "rt"
    code, stdout, stderr = replay_cli(capsys, "--bag", str(sample_bag), "--out", str(out),
                                      "--model", str(tiny_model_dir), "--realtime",
                                      "--overlay", "--max-image-age-s", "2", "--json")
    assert code == 0, stdout + stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    n = len(sample_plan.commands)
    assert summary["commands"] == summary["answers"] == summary["answered"] == n
    assert summary["count"] == sum(len(c.expressions) for c in sample_plan.commands)
    with BagReader(out) as bag:
        topics = {t: i.count for t, i in bag.topics.items()}
        answers = [(m.timestamp, deserialize(m.raw, Segmentation))
                   for m in bag.messages([SEG_TOPIC])]
    assert topics[SEG_TOPIC] == n and topics["/gsva/overlay"] == n
    assert topics[IMAGE_TOPIC] == sample_plan.n_frames and GROUND_TRUTH_TOPIC in topics
    frame_stamps = {sample_plan.frame_stamp(i) for i in range(sample_plan.n_frames)}
    for (ts, msg), cmd in zip(answers, sample_plan.commands, strict=True):
        assert msg.command == cmd.text and not msg.error
        # The node used a frame at or after the command's frame (it may lag, never lead).
        assert stamp_ns(msg.header) in frame_stamps
        assert stamp_ns(msg.header) >= sample_plan.frame_stamp(cmd.frame)
        assert ts >= cmd.stamp_ns


def test_realtime_replay_passes_presence_threshold_and_keep_empty_masks_to_the_node(
    sample_bag, tiny_model_dir, tmp_path, capsys, masks_find_nothing
):
    out = tmp_path / "rt"
    code, stdout, stderr = replay_cli(capsys, "--bag", str(sample_bag), "--out", str(out),
                                      "--model", str(tiny_model_dir), "--realtime",
                                      "--presence-threshold", "0.001", "--keep-empty-masks")
    assert code == 0, stdout + stderr[-3000:]
    answers = [deserialize(m.raw, Segmentation) for m in read_all(out, [SEG_TOPIC])]
    targets = [t for a in answers if not a.error for t in a.targets]
    # Only both parameters together make every target present with an empty mask.
    assert targets and all(t.present and not any(t.mask.data) for t in targets)
    assert all(a.note == "" for a in answers)
