"""Image preprocessing for the two GSVA branches, exactly as ``gsva_reference.md`` §1.1.

Both start from an RGB uint8 HxWx3 array (ROS ``bgr8`` must be converted before).

- CLIP: resize the shortest side to 224 (bicubic), center-crop 224×224, scale to [0, 1],
  normalize with CLIP's mean/std → 3×224×224 float32.
- SAM: ``ResizeLongestSide(S)`` (S = 1024 for GSVA-7B/13B), normalize on the 0–255 scale with
  SAM's pixel mean/std, then zero-pad bottom/right to S×S (padding = mean colour after
  normalization) → 3×S×S float32 plus the resized size (h', w') needed to crop masks back.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def _check_rgb(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError("image must be a uint8 numpy array")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty ({image.shape[1]}x{image.shape[0]})")


def clip_preprocess(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """RGB uint8 HxWx3 → float32 3×size×size (as CLIP ViT-L/14's CLIPImageProcessor)."""
    _check_rgb(image)
    nh, nw = clip_resized_size(image.shape[0], image.shape[1], size)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BICUBIC))
    top, left = (nh - size) // 2, (nw - size) // 2
    crop = resized[top : top + size, left : left + size].astype(np.float32) / 255.0
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(((crop - mean) / std).transpose(2, 0, 1).copy())


def clip_resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Size before CLIP's centre crop: the shortest edge to ``size``, the other scaled to keep
    the aspect ratio and truncated (int(), not round()), as CLIP's processor does."""
    if height <= width:
        return size, max(size, int(size * width / height))
    return max(size, int(size * height / width)), size


def sam_resized_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size after ``ResizeLongestSide(long_side)``: scale = S / max(H, W), rounded half up."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sam_preprocess(image: np.ndarray, size: int = 1024) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB uint8 HxWx3 → (float32 3×size×size, (h', w') resized size before padding)."""
    _check_rgb(image)
    nh, nw = sam_resized_size(image.shape[0], image.shape[1], size)
    # PIL bilinear with antialiasing, as torchvision's resize on a PIL image.
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    mean, std = np.asarray(SAM_PIXEL_MEAN, np.float32), np.asarray(SAM_PIXEL_STD, np.float32)
    normed = (resized.astype(np.float32) - mean) / std
    out = np.zeros((size, size, 3), np.float32)
    out[:nh, :nw] = normed
    return torch.from_numpy(out.transpose(2, 0, 1).copy()), (nh, nw)
