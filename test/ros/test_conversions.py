"""sensor_msgs/Image ↔ numpy conversions and result → message conversion (no DDS needed)."""

from __future__ import annotations

import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("gsva_ros.msg", reason="interfaces not built: run `make setup`")

from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from gsva_ros.result import Box, SegmentationResult, Target  # noqa: E402
from gsva_ros.ros.conversions import (  # noqa: E402
    PALETTE,
    SUPPORTED_ENCODINGS,
    ImageError,
    box_to_roi,
    image_to_rgb,
    is_empty_image,
    mask_to_msg,
    overlay,
    result_to_msg,
    rgb_to_msg,
)

CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1,
            "8UC1": 1, "8UC3": 3, "8UC4": 4}


def encode(rgb: np.ndarray, encoding: str, padding: int = 0, alpha: int = 200) -> Image:
    """Reference encoder written independently of the module under test."""
    h, w, _ = rgb.shape
    if CHANNELS[encoding] == 1:
        pixels = rgb[:, :, :1]
    elif encoding in ("rgb8",):
        pixels = rgb
    elif encoding in ("bgr8", "8UC3"):
        pixels = rgb[:, :, ::-1]
    elif encoding == "rgba8":
        pixels = np.dstack([rgb, np.full((h, w), alpha, np.uint8)])
    else:  # bgra8, 8UC4
        pixels = np.dstack([rgb[:, :, ::-1], np.full((h, w), alpha, np.uint8)])
    rows = pixels.reshape(h, -1)
    padded = np.hstack([rows, np.full((h, padding), 0xAB, np.uint8)])
    return Image(height=h, width=w, encoding=encoding, step=rows.shape[1] + padding,
                 data=array.array("B", padded.tobytes()))


def expected_rgb(rgb: np.ndarray, encoding: str) -> np.ndarray:
    return np.repeat(rgb[:, :, :1], 3, axis=2) if CHANNELS[encoding] == 1 else rgb


def random_rgb(h: int = 5, w: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def header(frame_id: str = "cam", sec: int = 12, nanosec: int = 34) -> Header:
    hdr = Header(frame_id=frame_id)
    hdr.stamp.sec, hdr.stamp.nanosec = sec, nanosec
    return hdr


# --------------------------------------------------------------------------- image → numpy
@pytest.mark.parametrize("encoding", SUPPORTED_ENCODINGS)
@pytest.mark.parametrize("padding", [0, 3])
def test_every_encoding_round_trips_with_and_without_padding(encoding, padding):
    rgb = random_rgb()
    out = image_to_rgb(encode(rgb, encoding, padding))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, expected_rgb(rgb, encoding))


def test_rgb8_is_a_zero_copy_view_and_others_copy_once():
    msg = rgb_to_msg(random_rgb())
    view = image_to_rgb(msg)
    assert np.shares_memory(view, np.frombuffer(msg.data, np.uint8))
    padded = encode(random_rgb(), "rgb8", padding=4)
    assert np.shares_memory(image_to_rgb(padded), np.frombuffer(padded.data, np.uint8))
    bgr = encode(random_rgb(), "bgr8")
    out = image_to_rgb(bgr)
    assert out.flags["C_CONTIGUOUS"]
    assert not np.shares_memory(out, np.frombuffer(bgr.data, np.uint8))


def test_big_endian_flag_is_harmless_for_8_bit():
    rgb = random_rgb()
    msg = encode(rgb, "bgr8")
    msg.is_bigendian = 1
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


def test_extra_trailing_data_is_ignored():
    rgb = random_rgb()
    msg = encode(rgb, "rgb8")
    msg.data.extend([1, 2, 3])
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(encoding="16UC1"), "unsupported image encoding '16UC1'"),
        (dict(encoding="yuv422"), "unsupported image encoding"),
        (dict(encoding=""), "unsupported image encoding ''"),
        (dict(height=0, width=0, step=0), r"image is empty \(0x0\)"),
        (dict(width=0), "image is empty"),
        (dict(height=0), "image is empty"),
        (dict(step=20), r"step 20 is smaller than width\*channels = 7\*3 = 21"),
        (dict(height=6), "truncated: 105 bytes, expected step\\*height = 21\\*6 = 126"),
        (dict(height=20000, width=20000, step=60000), "too large"),
        (dict(height=8000, width=8000, step=24000), "too large"),
    ],
)
def test_invalid_images_raise_image_error(change, match):
    msg = encode(random_rgb(), "rgb8")
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(ImageError, match=match):
        image_to_rgb(msg)


def test_truncated_data_raises_and_image_error_is_a_value_error():
    msg = encode(random_rgb(), "mono8")
    msg.data = msg.data[:-1]
    with pytest.raises(ValueError, match="truncated"):
        image_to_rgb(msg)


def test_error_messages_never_contain_pixel_data():
    msg = encode(np.full((5, 7, 3), 123, np.uint8), "rgb8")
    msg.encoding = "weird"
    with pytest.raises(ImageError) as info:
        image_to_rgb(msg)
    assert "123" not in str(info.value) and len(str(info.value)) < 200


def test_empty_request_image_detection():
    assert is_empty_image(Image())
    assert not is_empty_image(rgb_to_msg(random_rgb()))


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    encoding=st.sampled_from(SUPPORTED_ENCODINGS),
    padding=st.integers(0, 9),
    seed=st.integers(0, 2**16),
)
def test_property_message_numpy_round_trip(h, w, encoding, padding, seed):
    rgb = random_rgb(h, w, seed)
    msg = encode(rgb, encoding, padding)
    out = image_to_rgb(msg)
    np.testing.assert_array_equal(out, expected_rgb(rgb, encoding))
    # numpy → message → numpy is the identity for rgb8 (the node's overlay path).
    back = rgb_to_msg(out)
    assert (back.step, len(back.data)) == (3 * w, 3 * w * h)
    np.testing.assert_array_equal(image_to_rgb(back), out)


@settings(max_examples=100, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    cut=st.integers(1, 50),
    shrink_step=st.booleans(),
)
def test_property_inconsistent_sizes_are_always_rejected(h, w, cut, shrink_step):
    msg = encode(random_rgb(h, w), "bgr8")
    if shrink_step:
        msg.step = max(0, msg.step - 1 - cut % msg.step)
    else:
        msg.data = msg.data[: max(0, len(msg.data) - cut)]
    with pytest.raises(ImageError):
        image_to_rgb(msg)


# --------------------------------------------------------------------------- numpy → message
def test_mask_to_msg_is_mono8_at_source_size_with_header():
    labels = np.zeros((4, 6), np.uint8)
    labels[1:3, 2:5] = 2
    msg = mask_to_msg(labels, header("wrist"))
    assert (msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian) == (
        "mono8", 4, 6, 6, 0)
    assert msg.header.frame_id == "wrist"
    np.testing.assert_array_equal(np.frombuffer(msg.data, np.uint8).reshape(4, 6), labels)
    assert mask_to_msg(labels.astype(bool)).data.tolist() == (labels > 0).astype(
        np.uint8).ravel().tolist()


def test_mask_and_rgb_to_msg_reject_wrong_arrays():
    with pytest.raises(ValueError):
        mask_to_msg(np.zeros((2, 2, 1), np.uint8))
    with pytest.raises(ValueError):
        mask_to_msg(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError):
        rgb_to_msg(np.zeros((2, 2), np.uint8))


def test_rgb_to_msg_accepts_non_contiguous_views():
    rgb = random_rgb(6, 8)
    view = rgb[::2, ::2]
    np.testing.assert_array_equal(image_to_rgb(rgb_to_msg(view, header())), view)


def test_box_to_roi():
    roi = box_to_roi(Box(x_offset=3, y_offset=4, width=5, height=6))
    assert (roi.x_offset, roi.y_offset, roi.width, roi.height, roi.do_rectify) == (
        3, 4, 5, 6, False)


# --------------------------------------------------------------------------- result → message
def make_result() -> SegmentationResult:
    labels = np.zeros((5, 7), np.uint8)
    labels[0:2, 0:3] = 1
    labels[3:5, 4:7] = 2
    return SegmentationResult(
        command="the mug and the ghost",
        expressions=["the mug", "the ghost"],
        response="Sure, they are the mug:[SEG], the ghost:[REJ].",
        targets=[
            Target("the mug", True, 0.93, labels, [Box(0, 0, 3, 2), Box(4, 3, 3, 2)]),
            Target("the ghost", False, 0.71),
        ],
        image_size=(5, 7),
        decoding="slots",
        note="the ghost: [SEG] mask kept no object, reported absent",
    )


def test_result_to_msg_keeps_header_order_and_marks_absent_targets():
    hdr = header("base_camera", 99, 7)
    msg = result_to_msg(make_result(), hdr, "the mug and the ghost", "", 12.5)
    assert (msg.header.frame_id, msg.header.stamp.sec, msg.header.stamp.nanosec) == (
        "base_camera", 99, 7)
    assert msg.command == "the mug and the ghost" and msg.error == ""
    assert msg.response.startswith("Sure")
    assert msg.latency_ms == pytest.approx(12.5)
    assert msg.note == "the ghost: [SEG] mask kept no object, reported absent"
    mug, ghost = msg.targets
    assert (mug.phrase, mug.present) == ("the mug", True)
    assert mug.score == pytest.approx(0.93)
    assert (mug.mask.height, mug.mask.width, mug.mask.encoding) == (5, 7, "mono8")
    assert mug.mask.header.frame_id == "base_camera"
    assert [(r.x_offset, r.y_offset, r.width, r.height) for r in mug.objects] == [
        (0, 0, 3, 2), (4, 3, 3, 2)]
    assert (ghost.phrase, ghost.present) == ("the ghost", False)
    assert (ghost.mask.height, ghost.mask.width, len(ghost.mask.data)) == (0, 0, 0)
    assert len(ghost.objects) == 0


def test_result_to_msg_for_errors_has_no_targets():
    msg = result_to_msg(None, None, "the cup", "no image received on /image yet", float("nan"))
    assert msg.targets == [] and msg.response == "" and msg.error.startswith("no image")
    assert msg.note == ""
    assert msg.latency_ms == 0.0 and msg.header.frame_id == ""


# --------------------------------------------------------------------------- overlay
def test_overlay_blends_target_colours_draws_boxes_and_keeps_the_input():
    rgb = np.zeros((20, 20, 3), np.uint8)
    labels = np.zeros((20, 20), np.uint8)
    labels[2:12, 2:12] = 1
    result = make_result()
    result.targets = [Target("the mug", True, 0.9, labels, [Box(2, 2, 10, 10)]),
                      Target("the ghost", False, 0.7)]
    out = overlay(rgb, result)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert not rgb.any(), "the input image is not modified"
    half = np.asarray(PALETTE[0]) // 2  # alpha 0.5 over black, inside the mask
    assert np.abs(out[6, 6].astype(int) - half).max() <= 1
    assert out[2, 2].tolist() == list(PALETTE[0])  # box outline in full colour
    assert out[0, 19].tolist() == [0, 0, 0]  # background untouched


def test_overlay_without_result_or_present_targets_is_a_copy():
    rgb = random_rgb()
    assert np.array_equal(overlay(rgb, None), rgb)
    result = make_result()
    result.targets = [Target("x", False, 0.6)]
    out = overlay(rgb, result)
    assert np.array_equal(out, rgb) and not np.shares_memory(out, rgb)
