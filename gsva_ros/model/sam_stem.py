"""Stems for SAM's ViT image encoder: what turns pixels into the 1/16 token grid.

SAM (and GSVA-7B) uses ``patchify``: one 16×16 stride-16 convolution. The tiny model may use
``conv`` / ``conv-ln`` instead: four 3×3 stride-2 convolutions (GELU between, and for
``conv-ln`` a channel LayerNorm after each), then a 1×1 projection to the embedding width —
the same 1/16 grid, so nothing after the stem changes.

Why: trained from scratch at the tiny sizes, the patchify ViT hardly learns object shape
(a small object is sub-patch detail); the same tower with a convolutional stem does
(``experiments/vision_learnability/``: mask-pooled shape read-out 0.46 → 0.92 after 3,000
steps). Pretrained SAM weights exist only for ``patchify``.
"""

from __future__ import annotations

from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from gsva_ros.model.config import SAM_STEMS as STEMS

# Output channels of the four stride-2 convolutions (input 3 channels, 2⁴ = 16× down).
CONV_STEM_CHANNELS = (16, 32, 64, 64)


def conv_stem(embed_dim: int, norm: bool) -> nn.Sequential:
    """B×3×S×S pixels → B×embed_dim×S/16×S/16, like SAM's 16×16 patch projection."""
    layers: list[nn.Module] = []
    c_in = 3
    for c in CONV_STEM_CHANNELS:
        layers.append(nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1))
        if norm:
            layers.append(LayerNorm2d(c))
        layers.append(nn.GELU())
        c_in = c
    layers.append(nn.Conv2d(c_in, embed_dim, kernel_size=1))
    return nn.Sequential(*layers)


def set_stem(encoder: nn.Module, stem: str, embed_dim: int) -> None:
    """Put ``stem`` into a segment_anything ``ImageEncoderViT`` (``patchify`` leaves SAM's own).

    It replaces ``encoder.patch_embed.proj``: ``PatchEmbed`` applies it and moves channels
    last, so the token grid and everything after it are unchanged."""
    if stem == "patchify":
        return
    if stem not in STEMS:
        raise ValueError(f"unknown SAM stem {stem!r}; choose from {', '.join(STEMS)}")
    encoder.patch_embed.proj = conv_stem(embed_dim, norm=stem == "conv-ln")
