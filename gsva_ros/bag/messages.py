"""``gsva_ros/Segmentation`` messages → numpy / engine-style results (the reverse direction).

:mod:`gsva_ros.ros.conversions` builds messages from results; the bag tools also need to read
them back (ground truth, recorded answers, overlays of recorded answers). Messages may be
rclpy messages or anything with the same fields.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gsva_ros.result import Box, SegmentationResult, Target


def mask_from_msg(image: Any) -> np.ndarray | None:
    """A ``mono8``/``8UC1`` mask image → HxW uint8 array (a copy); None for the 0×0 image.

    Raises ValueError for other encodings or a truncated payload.
    """
    h, w, step = int(image.height), int(image.width), int(image.step)
    if h == 0 or w == 0:
        return None
    if image.encoding not in ("mono8", "8UC1"):
        raise ValueError(f"mask must be mono8, got {image.encoding!r}")
    step = step or w
    data = np.frombuffer(bytes(image.data), dtype=np.uint8)
    if step < w or data.size < step * h:
        raise ValueError(f"mask data is truncated ({data.size} bytes for {w}x{h}, step {step})")
    return data[: step * h].reshape(h, step)[:, :w].copy()


def target_case(target: Any) -> str:
    """GRES case of a ground-truth Target: ``no-target``, ``single`` or ``multi``.

    ``objects`` holds one box per referred object, so its length tells single from multi.
    """
    if not target.present:
        return "no-target"
    return "multi" if len(target.objects) > 1 else "single"


def segmentation_to_result(msg: Any) -> SegmentationResult:
    """``gsva_ros/Segmentation`` → :class:`SegmentationResult` (e.g. to draw an overlay)."""
    targets = []
    size: tuple[int, int] = (0, 0)
    for t in msg.targets:
        mask = mask_from_msg(t.mask) if t.present else None
        if mask is not None:
            size = (int(mask.shape[0]), int(mask.shape[1]))
        boxes = [Box(int(r.x_offset), int(r.y_offset), int(r.width), int(r.height))
                 for r in t.objects]
        targets.append(Target(t.phrase, bool(t.present), float(t.score), mask, boxes))
    return SegmentationResult(
        command=msg.command,
        expressions=[t.phrase for t in msg.targets],
        response=msg.response,
        targets=targets,
        image_size=size,
        decoding="",
        note=msg.error,
    )
