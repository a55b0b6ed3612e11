"""``sensor_msgs/Image`` ↔ numpy and engine results → ``gsva_ros`` messages, without cv_bridge.

cv_bridge from PyPI is broken with NumPy 2 (see docs), and the node only needs 8-bit colour and
grey images, so the conversion is a few NumPy views. Rules:

- Every image is validated before any pixel is touched (encoding, sizes, ``step``, data length);
  failures raise :class:`ImageError` whose message is safe to publish to the user (it never
  contains pixel data).
- ``rgb8`` (and ``rgba8``) come back as zero-copy views of the message buffer; encodings that
  need channel reordering or expansion are copied exactly once.
- Masks go out as ``mono8`` label images at the source size (0 = background, k = object k).
"""

from __future__ import annotations

import array
import math
from collections.abc import Sequence

import cv2
import numpy as np
from sensor_msgs.msg import Image, RegionOfInterest
from std_msgs.msg import Header

from gsva_ros.msg import Segmentation
from gsva_ros.msg import Target as TargetMsg
from gsva_ros.result import Box, SegmentationResult

# encoding → (channels, channel order as indices into the source that give R, G, B)
_ENCODINGS: dict[str, tuple[int, tuple[int, ...]]] = {
    "rgb8": (3, (0, 1, 2)),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, (0, 1, 2)),
    "bgra8": (4, (2, 1, 0)),
    "mono8": (1, (0, 0, 0)),
    # OpenCV type names: by OpenCV convention 3/4-channel data is BGR(A).
    "8UC1": (1, (0, 0, 0)),
    "8UC3": (3, (2, 1, 0)),
    "8UC4": (4, (2, 1, 0)),
}
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS)

# Refuse absurd frames before allocating anything (a corrupted header can claim 4G×4G).
MAX_SIDE = 16384
MAX_PIXELS = 40_000_000  # same limit as the engine's check


class ImageError(ValueError):
    """An image message that cannot be converted; the message is user-facing."""


# ---------------------------------------------------------------------------------- images in
def image_to_rgb(msg: Image) -> np.ndarray:
    """``sensor_msgs/Image`` → RGB uint8 HxWx3.

    Returns a zero-copy view of ``msg.data`` for ``rgb8``/``rgba8`` (strided when rows are
    padded or alpha is dropped), otherwise one contiguous copy. Raises :class:`ImageError`.
    """
    channels, order = _check_image(msg)
    h, w = msg.height, msg.width
    # frombuffer over the message's array.array is a view: no copy of the payload here.
    rows = np.frombuffer(msg.data, dtype=np.uint8, count=msg.step * h).reshape(h, msg.step)
    pixels = rows[:, : w * channels].reshape(h, w, channels)
    if channels == 1:
        # Grey → RGB needs new memory anyway; np.repeat writes it in one pass.
        return np.repeat(pixels, 3, axis=2)
    if order == (0, 1, 2):
        return pixels[:, :, :3]
    # BGR(A) → RGB: reversed channel view, materialised once as a contiguous array.
    return np.ascontiguousarray(pixels[:, :, 2::-1])


def _short_encoding(encoding: str, limit: int = 32) -> str:
    """The encoding for messages and logs, cut so a garbage field cannot flood them."""
    return encoding if len(encoding) <= limit else encoding[:limit] + f"…({len(encoding)} chars)"


def _check_image(msg: Image) -> tuple[int, tuple[int, ...]]:
    """Validate an image message header against its payload; return (channels, order)."""
    encoding = msg.encoding
    if encoding not in _ENCODINGS:
        raise ImageError(
            f"unsupported image encoding {_short_encoding(encoding)!r}; "
            f"supported: {', '.join(SUPPORTED_ENCODINGS)}"
        )
    channels, order = _ENCODINGS[encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h == 0 or w == 0:
        raise ImageError(f"image is empty ({w}x{h})")
    if h > MAX_SIDE or w > MAX_SIDE or h * w > MAX_PIXELS:
        raise ImageError(
            f"image is too large ({w}x{h}); limits are {MAX_SIDE} px per side and "
            f"{MAX_PIXELS} pixels"
        )
    if step < w * channels:
        raise ImageError(
            f"image step {step} is smaller than width*channels = {w}*{channels} = "
            f"{w * channels} for {encoding}"
        )
    # is_bigendian is irrelevant for 8-bit channels, so it is accepted either way.
    size = len(msg.data)
    if size < step * h:
        raise ImageError(
            f"image data is truncated: {size} bytes, expected step*height = {step}*{h} = "
            f"{step * h}"
        )
    return channels, order


def describe_image(msg: Image) -> str:
    """One-line summary for logs (never the payload)."""
    encoding = _short_encoding(msg.encoding) if msg.encoding else "<no encoding>"
    return f"{msg.width}x{msg.height} {encoding} step={msg.step}"


def is_empty_image(msg: Image) -> bool:
    """True for the 0×0 image a service request uses to mean "use the latest camera image"."""
    return msg.width == 0 and msg.height == 0


# ---------------------------------------------------------------------------------- images out
def _to_array_data(a: np.ndarray) -> array.array:
    """Contiguous uint8 array → ``array.array('B')`` in one copy.

    Assigning bytes to ``Image.data`` makes the generated setter type-check every element in
    Python (slow for megapixel images); an ``array.array`` is taken as is.
    """
    out = array.array("B")
    out.frombytes(np.ascontiguousarray(a, dtype=np.uint8).data)
    return out


def _image(a: np.ndarray, encoding: str, channels: int, header: Header | None) -> Image:
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(a.shape[0]), int(a.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * channels
    msg.data = _to_array_data(a)
    return msg


def mask_to_msg(labels: np.ndarray, header: Header | None = None) -> Image:
    """HxW uint8 label map → ``mono8`` Image (0 = background, k = object k)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {labels.shape}")
    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    elif labels.dtype != np.uint8:
        raise ValueError(f"mask must be uint8 (or bool), got {labels.dtype}")
    return _image(labels, "mono8", 1, header)


def rgb_to_msg(rgb: np.ndarray, header: Header | None = None) -> Image:
    """RGB uint8 HxWx3 → ``rgb8`` Image."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {rgb.dtype} {rgb.shape}")
    return _image(rgb, "rgb8", 3, header)


def empty_image(header: Header | None = None) -> Image:
    """The 0×0 mono8 image used for an absent target's mask."""
    msg = Image(encoding="mono8")
    if header is not None:
        msg.header = header
    return msg


# ---------------------------------------------------------------------------------- results out
def box_to_roi(box: Box) -> RegionOfInterest:
    return RegionOfInterest(
        x_offset=int(box.x_offset),
        y_offset=int(box.y_offset),
        width=int(box.width),
        height=int(box.height),
        do_rectify=False,
    )


def result_to_msg(
    result: SegmentationResult | None,
    header: Header | None,
    command: str,
    error: str = "",
    latency_ms: float = 0.0,
) -> Segmentation:
    """Engine result (or None on error) → ``gsva_ros/msg/Segmentation``.

    Targets keep command order; an absent target has ``present=False``, a 0×0 mask and no
    objects. Each mask carries the source image header so it can be used on its own. The
    engine's ``note`` (why its answer differs from the model's plain one) travels as ``note``.
    """
    msg = Segmentation()
    if header is not None:
        msg.header = header
    msg.command = command
    msg.error = error
    msg.latency_ms = float(latency_ms) if math.isfinite(latency_ms) else 0.0
    if result is not None:
        msg.response = result.response
        msg.note = result.note
        msg.targets = [_target_to_msg(t, msg.header) for t in result.targets]
    return msg


def _target_to_msg(target, header: Header) -> TargetMsg:
    msg = TargetMsg(phrase=target.phrase, present=bool(target.present), score=float(target.score))
    if target.present and target.mask is not None:
        msg.mask = mask_to_msg(target.mask, header)
        msg.objects = [box_to_roi(b) for b in target.boxes]
    else:
        msg.mask = empty_image(header)
    return msg


# ---------------------------------------------------------------------------------- overlay
# Distinct, colour-blind-friendly colours (Okabe–Ito), RGB; target i gets PALETTE[i % len].
PALETTE: Sequence[tuple[int, int, int]] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)


_LABEL_HEIGHT = 12  # pixels needed above a box for its label


def overlay(rgb: np.ndarray, result: SegmentationResult | None, alpha: float = 0.5) -> np.ndarray:
    """Draw each present target's mask (alpha-blended, one colour per target) and its boxes.

    Returns a new RGB uint8 image; ``rgb`` is not modified.
    """
    out = np.array(rgb, dtype=np.uint8, copy=True, order="C")
    if result is None:
        return out
    for i, target in enumerate(result.targets):
        if not target.present or target.mask is None:
            continue
        colour = PALETTE[i % len(PALETTE)]
        mask = target.mask > 0
        if mask.shape != out.shape[:2]:
            continue  # defensive: a mask from another frame size must not crash the overlay
        if mask.any():
            blended = out[mask] * (1.0 - alpha) + np.asarray(colour, np.float32) * alpha
            out[mask] = blended.astype(np.uint8)
        for box in target.boxes:
            p0 = (int(box.x_offset), int(box.y_offset))
            p1 = (int(box.x_offset + box.width - 1), int(box.y_offset + box.height - 1))
            cv2.rectangle(out, p0, p1, colour, 1)
        if target.boxes:
            # Label above the largest object, or below it when there is no room above, so the
            # text never covers the mask it names.
            b = target.boxes[0]
            y = b.y_offset - 3 if b.y_offset >= _LABEL_HEIGHT else b.y_offset + b.height + 10
            cv2.putText(out, target.phrase[:40], (int(b.x_offset), int(y)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    return out
