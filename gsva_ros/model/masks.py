"""From one expression's binary mask to the published label map and object boxes.

GSVA gives one (union) mask per referring expression; robots often need the objects in it
("the red mugs" → which mug is which), so the union can be split into connected components.
"""

from __future__ import annotations

import cv2
import numpy as np

from gsva_ros.result import Box

MAX_OBJECTS = 255  # label maps are mono8


def label_objects(
    mask: np.ndarray, instance_split: bool = True, min_area: int = 0
) -> tuple[np.ndarray, list[Box]]:
    """HxW bool mask → (HxW uint8 label map, boxes) with 0 = background, k = object k.

    With ``instance_split`` each 8-connected component is an object, largest first; components
    smaller than ``min_area`` pixels are dropped (speckle). Without it the whole mask is
    object 1 (kept when its area reaches ``min_area``). At most 255 objects are kept.
    """
    mask = np.asarray(mask, dtype=bool)
    labels = np.zeros(mask.shape, np.uint8)
    if not mask.any():
        return labels, []
    if not instance_split:
        if int(mask.sum()) < min_area:
            return labels, []
        labels[mask] = 1
        return labels, [_box(mask)]
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = [i + 1 for i in np.argsort(-areas, kind="stable") if areas[i] >= max(min_area, 1)]
    boxes: list[Box] = []
    for k, comp_id in enumerate(order[:MAX_OBJECTS], start=1):
        labels[comp == comp_id] = k
        x, y, w, h = (int(v) for v in stats[comp_id, :4])
        boxes.append(Box(x_offset=x, y_offset=y, width=w, height=h))
    return labels, boxes


def _box(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return Box(
        x_offset=x0, y_offset=y0, width=int(xs.max()) - x0 + 1, height=int(ys.max()) - y0 + 1
    )
