"""Stems for CLIP's vision tower: what turns the 224×224 crop into the patch grid.

CLIP (and GSVA-7B) uses ``patchify``: one p×p stride-p convolution (p = 14). The tiny model
may use ``conv``: a 3×3 stride-2 convolution and a GELU, then a (p/2)×(p/2) stride-p/2
projection to the tower's width (for p = 14 each token sees a 15×15 window instead of its own
14×14 patch) — the same grid, so the position embeddings and everything after them are
unchanged. Kept this small on purpose: a second 3×3 convolution or a LayerNorm at half
resolution (as SAM's ``conv-ln``) makes the tower's forward and backward 2-3× slower on CPU.

Why: the language model decides [SEG] or [REJ] from CLIP's features alone. Trained from
scratch, the patchify tower does not learn which shapes are in the image (a linear probe of
its features under each object's mask reads shape at chance), so the model cannot reject
"the star" in a scene without one; SAM's tower, given a convolutional stem, does learn shape
(``sam_stem``). Pretrained CLIP weights exist only for ``patchify``.
"""

from __future__ import annotations

import torch
from torch import nn

from gsva_ros.model.config import VISION_STEMS as STEMS

# Channels of the 3×3 convolution at half resolution.
CONV_STEM_CHANNELS = 32


class ConvStem(nn.Sequential):
    """B×3×S×S pixels → B×dim×S/p×S/p, like CLIP's p×p patch projection."""

    def __init__(self, dim: int, patch: int) -> None:
        c = CONV_STEM_CHANNELS
        super().__init__(
            nn.Conv2d(3, c, 3, 2, 1), nn.GELU(), nn.Conv2d(c, dim, patch // 2, patch // 2)
        )

    @property
    def weight(self) -> torch.Tensor:
        # transformers' CLIPVisionEmbeddings casts its input to ``patch_embedding.weight.dtype``
        return self[-1].weight


def set_stem(embeddings: nn.Module, stem: str) -> None:
    """Put ``stem`` into transformers' ``CLIPVisionEmbeddings`` (``patchify`` leaves CLIP's own).

    It replaces ``embeddings.patch_embedding``, which the embeddings apply before flattening
    the grid, so the token count and the position embeddings stay as they are."""
    if stem == "patchify":
        return
    if stem not in STEMS:
        raise ValueError(f"unknown CLIP stem {stem!r}; choose from {', '.join(STEMS)}")
    patch = embeddings.patch_size
    if patch % 2:
        raise ValueError(f"the {stem!r} CLIP stem needs an even patch size, got {patch}")
    embeddings.patch_embedding = ConvStem(embeddings.embed_dim, patch)
