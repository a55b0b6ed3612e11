"""Plain result types returned by :class:`gsva_ros.engine.GSVAEngine` (no torch, no ROS).

The ROS node converts these 1:1 into ``gsva_ros/msg/Segmentation`` and ``Target``; the CLI
tools (eval, replay, bench) read them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Why a ``generate`` command was answered with slot decoding (``SegmentationResult.fallback``).
FALLBACK_SLOT_COUNT = "slot_count"  # the answer had another number of slots than expressions
FALLBACK_MISCOPIED = "miscopied_phrase"  # a slot's text named another expression


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in source-image pixels (same fields as sensor_msgs/RegionOfInterest)."""

    x_offset: int
    y_offset: int
    width: int
    height: int


@dataclass
class Target:
    """The answer for one referring expression.

    ``present`` is False when the model answered ``[REJ]`` (target absent); then ``mask`` is
    None and ``boxes`` is empty. ``score`` is the confidence of the present/absent decision:
    the softmax over the ``[SEG]`` and ``[REJ]`` logits, taken for the chosen token (0.5..1 with
    GSVA's presence threshold 0.5; with a threshold t, present targets have score ≥ t and
    absent ones 1 − score < t, so an absent answer can carry less than 0.5).
    ``mask`` is an HxW uint8 label map: 0 = background, k = object k of this phrase (one
    object when instance splitting is off); ``boxes[k-1]`` bounds object k.
    ``forced_mask`` is only filled when the engine is asked for masks of rejected slots too
    (GSVA's lenient evaluation protocol scores them): a bool HxW array, else None.
    """

    phrase: str
    present: bool
    score: float
    mask: np.ndarray | None = None
    boxes: list[Box] = field(default_factory=list)
    forced_mask: np.ndarray | None = None

    @property
    def binary_mask(self) -> np.ndarray | None:
        """The union of all objects as a bool HxW array (None when absent)."""
        return None if self.mask is None else self.mask > 0


@dataclass
class SegmentationResult:
    """The answer to one command on one image.

    ``response`` is the model's answer text (e.g. ``"Sure, they are red mug:[SEG], knife:[REJ]."``).
    ``note`` is empty unless the engine deviated from the model's plain answer: generate mode
    producing the wrong slot count, or a slot whose text does not name its expression, falls
    back to slot decoding, and a ``[SEG]`` whose mask kept no object is reported absent
    (``GSVAEngine(reject_empty_masks=True)``); both say so here.
    ``fallback`` says why ``generate`` was answered with slot decoding (``FALLBACK_*``; empty
    when it was not), for tools that count the reasons without parsing ``note``.
    ``timings_ms`` holds per-stage wall times (``sam``, ``clip``, ``prefill``, ``decode``,
    ``masks``, ``total``); stages served from the frame cache are reported as 0.
    """

    command: str
    expressions: list[str]
    response: str
    targets: list[Target]
    image_size: tuple[int, int]
    decoding: str
    note: str = ""
    fallback: str = ""
    frame_cached: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
