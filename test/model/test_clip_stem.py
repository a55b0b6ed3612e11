"""CLIP's vision-tower stem: the convolutional option keeps CLIP's token grid and checkpoints."""

from __future__ import annotations

import dataclasses

import torch

from gsva_ros.model.clip_stem import ConvStem
from gsva_ros.model.gsva import GSVAModel


def _embeddings(model: GSVAModel) -> torch.nn.Module:
    return next(m for m in model.llava.model.vision_tower.modules()
                if hasattr(m, "patch_embedding"))


def test_conv_stem_keeps_clips_token_grid_and_replaces_the_patch_kernel(tiny_config):
    torch.manual_seed(0)
    conv = GSVAModel(dataclasses.replace(tiny_config, vision_stem="conv")).eval()
    patchify = GSVAModel(dataclasses.replace(tiny_config, vision_stem="patchify")).eval()
    size, p = tiny_config.vision_image_size, tiny_config.vision_patch_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert conv.encode_clip(x).shape == patchify.encode_clip(x).shape == (
            2, (size // p) ** 2, tiny_config.hidden_size)
    stem = _embeddings(conv).patch_embedding
    assert isinstance(stem, ConvStem)
    assert [m.stride for m in stem if isinstance(m, torch.nn.Conv2d)] == [(2, 2), (p // 2,) * 2]
    assert isinstance(_embeddings(patchify).patch_embedding, torch.nn.Conv2d)
    kernels = {tuple(v.shape[-2:]) for k, v in conv.state_dict().items()
               if "patch_embedding" in k and k.endswith("weight")}
    assert (p, p) not in kernels  # CLIP's 14×14 patch kernel is gone


def test_conv_stem_token_sees_its_patch_and_one_pixel_before_it():
    # p = 14: a 3×3 stride-2 convolution, then a 7×7 stride-7 one → token t reads input rows
    # (and columns) 14t − 1 … 14t + 13: its own patch and the previous patch's last pixel.
    torch.manual_seed(0)
    stem = ConvStem(8, 14).eval()
    x = torch.randn(1, 3, 42, 42)

    def changed(row: int) -> list[bool]:  # which tokens of column 0 a change at row moves
        y = x.clone()
        y[..., row, 5] += 1.0
        with torch.no_grad():
            return (stem(y) != stem(x))[0, :, :, 0].any(0).tolist()

    assert changed(0) == [True, False, False]
    assert changed(13) == [True, True, False]  # last row of patch 0, seen by token 1 too
    assert changed(14) == [False, True, False]
    assert changed(41) == [False, False, True]


def test_conv_stem_follows_the_models_dtype():
    # transformers' CLIP embeddings cast pixels to ``patch_embedding.weight.dtype``
    stem = ConvStem(8, 14).to(torch.bfloat16)
    assert stem.weight.dtype == torch.bfloat16
    assert stem(torch.randn(1, 3, 28, 28, dtype=torch.bfloat16)).shape == (1, 8, 2, 2)
