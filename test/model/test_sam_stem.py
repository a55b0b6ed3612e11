"""Image-encoder stems: the convolutional options keep the towers' geometry and checkpoints
(SAM's here; CLIP's own in test_clip_stem.py, its config and checkpoint checks here)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gsva_ros.model.config import GSVAConfig
from gsva_ros.model.gsva import GSVAModel, build_sam


@pytest.mark.parametrize("stem", ["conv", "conv-ln"])
def test_conv_stem_gives_sams_token_grid_and_a_different_encoder(tiny_config, stem):
    cfg = dataclasses.replace(tiny_config, sam_stem=stem)
    torch.manual_seed(0)
    patchify = build_sam(tiny_config).image_encoder
    torch.manual_seed(0)
    conv = build_sam(cfg).image_encoder
    x = torch.randn(2, 3, cfg.sam_image_size, cfg.sam_image_size)
    g = cfg.sam_embedding_size
    with torch.no_grad():
        tokens = conv.patch_embed(x)
        assert tokens.shape == patchify.patch_embed(x).shape == (2, g, g, cfg.sam_embed_dim)
        assert conv(x).shape == (2, cfg.sam_prompt_dim, g, g)
    names = {k for k in conv.state_dict() if k.startswith("patch_embed.")}
    assert "patch_embed.proj.weight" not in names  # SAM's 16×16 kernel is gone
    strided = [m for m in conv.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert [m.stride for m in strided] == [(2, 2)] * 4 + [(1, 1)]
    norms = [m for m in conv.patch_embed.proj if type(m).__name__ == "LayerNorm2d"]
    assert len(norms) == (4 if stem == "conv-ln" else 0)


def test_conv_stem_model_round_trips_through_a_checkpoint(tiny_config, tiny_tokenizer, tmp_path):
    """Both towers' convolutional stems (SAM's and CLIP's, ``clip_stem``) load bit-exactly."""
    from gsva_ros.model.checkpoint import load_checkpoint, save_checkpoint

    cfg = dataclasses.replace(tiny_config, sam_stem="conv-ln", vision_stem="conv")
    torch.manual_seed(1)
    model = GSVAModel(cfg).eval()
    save_checkpoint(model, tiny_tokenizer, tmp_path / "m")
    loaded, _ = load_checkpoint(tmp_path / "m")
    assert (loaded.config.sam_stem, loaded.config.vision_stem) == ("conv-ln", "conv")
    sam_x = torch.randn(1, 3, cfg.sam_image_size, cfg.sam_image_size)
    clip_x = torch.randn(1, 3, cfg.vision_image_size, cfg.vision_image_size)
    with torch.no_grad():
        assert torch.equal(model.encode_sam(sam_x), loaded.encode_sam(sam_x))
        assert torch.equal(model.encode_clip(clip_x), loaded.encode_clip(clip_x))


@pytest.mark.parametrize("field, bad_patch, patch_error", [
    ("sam_stem", {"sam_patch_size": 14}, "16-px patches"),
    ("vision_stem", {"vision_patch_size": 15}, "even vision_patch_size"),  # CLIP's tower
])
def test_config_checks_the_stems(field, bad_patch, patch_error):
    base = GSVAConfig(name="t").to_dict()
    del base[field]
    assert getattr(GSVAConfig.from_dict(base), field) == "patchify"  # configs written before
    with pytest.raises(ValueError, match=field):
        GSVAConfig.from_dict({**base, field: "resnet"})
    with pytest.raises(ValueError, match=patch_error):
        GSVAConfig.from_dict({**base, field: "conv", **bad_patch})
    assert getattr(GSVAConfig.from_dict({**base, field: "conv"}), field) == "conv"
