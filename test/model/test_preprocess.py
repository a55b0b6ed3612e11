"""CLIP and SAM preprocessing constants and shapes (gsva_reference.md §1.1)."""

import numpy as np
import pytest
import torch

from gsva_ros.model import preprocess as pp


def test_constants_match_spec():
    assert pp.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert pp.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert pp.SAM_PIXEL_MEAN == (123.675, 116.28, 103.53)
    assert pp.SAM_PIXEL_STD == (58.395, 57.12, 57.375)


@pytest.mark.parametrize(("h", "w"), [(480, 640), (640, 480), (100, 100), (1, 7)])
def test_sam_resize_longest_side(h, w):
    nh, nw = pp.sam_resized_size(h, w, 1024)
    assert max(nh, nw) == 1024
    assert nh == int(h * 1024 / max(h, w) + 0.5) and nw == int(w * 1024 / max(h, w) + 0.5)


def test_sam_pads_bottom_right_with_mean_colour():
    img = np.full((480, 640, 3), 200, np.uint8)
    x, (nh, nw) = pp.sam_preprocess(img, 1024)
    assert x.shape == (3, 1024, 1024) and (nh, nw) == (768, 1024)
    expected = (200 - np.array(pp.SAM_PIXEL_MEAN)) / np.array(pp.SAM_PIXEL_STD)
    assert torch.allclose(x[:, 100, 100], torch.tensor(expected, dtype=torch.float32), atol=1e-4)
    assert torch.all(x[:, nh:, :] == 0) and torch.all(x[:, :, nw:] == 0)


def test_clip_center_crop_224():
    img = np.zeros((224, 448, 3), np.uint8)
    img[:, 112:336] = 255  # exactly the central square is white
    x = pp.clip_preprocess(img)
    assert x.shape == (3, 224, 224)
    white = (1.0 - np.array(pp.CLIP_MEAN)) / np.array(pp.CLIP_STD)
    assert torch.allclose(x[:, 112, 5], torch.tensor(white, dtype=torch.float32), atol=1e-3)
    assert torch.allclose(x[:, 112, 218], torch.tensor(white, dtype=torch.float32), atol=1e-3)


def test_bad_images_are_refused():
    with pytest.raises(ValueError):
        pp.clip_preprocess(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError):
        pp.sam_preprocess(np.zeros((10, 10, 3), np.float32))
