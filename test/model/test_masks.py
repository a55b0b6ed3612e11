"""Mask post-processing: label maps, instance split, boxes, SAM upsampling."""

import numpy as np
import torch

from gsva_ros.model.masks import label_objects
from gsva_ros.result import Box


def _two_blobs():
    m = np.zeros((40, 60), bool)
    m[5:15, 5:20] = True  # 150 px
    m[20:35, 30:55] = True  # 375 px
    m[38, 0] = True  # 1 px speckle
    return m


def test_instance_split_orders_by_area_and_drops_speckle():
    labels, boxes = label_objects(_two_blobs(), instance_split=True, min_area=4)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1, 2}
    assert boxes == [Box(30, 20, 25, 15), Box(5, 5, 15, 10)]
    assert (labels == 1).sum() == 375 and (labels == 2).sum() == 150 and labels[38, 0] == 0


def test_union_without_split():
    labels, boxes = label_objects(_two_blobs(), instance_split=False)
    assert set(np.unique(labels)) == {0, 1} and (labels == 1).sum() == 526
    assert boxes == [Box(0, 5, 55, 34)]


def test_empty_and_too_small_masks():
    assert label_objects(np.zeros((4, 4), bool))[1] == []
    small = np.zeros((10, 10), bool)
    small[2, 2] = True
    assert label_objects(small, instance_split=False, min_area=5)[1] == []
    assert label_objects(small, instance_split=True, min_area=5)[0].max() == 0


def test_postprocess_crops_padding_and_resizes(tiny_model):
    s = tiny_model.config.sam_image_size
    low = torch.full((1, 1, s // 4, s // 4), -5.0)
    low[..., : s // 8, :] = 5.0  # top half of the padded square is "on"
    # resized content occupies the top half (h' = s/2): after the crop, everything is on
    out = tiny_model.postprocess_masks(low, (s // 2, s), (30, 60))
    assert out.shape == (1, 30, 60) and out.dtype == torch.float32
    assert bool((out > 0).all())
