"""Shared pieces of the vision learnability experiments (see README.md next to this file)."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from gsva_ros.data.synth import COLORS, SHAPES, SceneSpec, sample_scene
from gsva_ros.model.sam_stem import STEMS, set_stem  # noqa: F401  (the scripts' stem)


def add_scene_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=0, help="training steps (0: use --secs)")
    parser.add_argument("--secs", type=float, default=300.0, help="training wall time")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-objects", type=int, default=6, help="keep the first K objects")
    parser.add_argument("--upright", action="store_true", help="no rotation")
    parser.add_argument(
        "--min-radius",
        type=float,
        default=0.0,
        help="enlarge objects to at least this fraction of the short side",
    )


def scene(seed: int, index: int, args: argparse.Namespace) -> SceneSpec:
    """A synthetic scene as ``gsva-ros synth`` draws it, then edited as the flags ask."""
    spec = sample_scene(np.random.default_rng([seed, index]))
    spec.objects = spec.objects[: args.max_objects]
    side = min(spec.height, spec.width)
    for obj in spec.objects:
        if args.upright:
            obj.angle = 0.0
        obj.radius = max(obj.radius, args.min_radius * side)
    return spec


def shape_index(name: str) -> int:
    return list(SHAPES).index(name)


def color_index(name: str) -> int:
    return list(COLORS).index(name)


def optimizer_step(opt: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor) -> None:
    """One AdamW step with the training recipe's gradient clipping (norm 1.0)."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def add_stem_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stem", choices=STEMS, default="patchify",
        help="SAM ViT stem: its 16x16 patchify projection, 3x3 stride-2 convolutions, "
        "or those with a LayerNorm after each (gsva_ros.model.sam_stem)",
    )


def pooled_by_mask(
    emb: torch.Tensor, items: list
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each object's embedding averaged under its mask (N×C) and its (shape, colour) (N×2).

    ``emb`` is the B×C×g×g image embedding of ``items`` (``sam_prompt.Item``: pixels,
    (shape, colour) per object, low-res masks, token labels)."""
    feats, labels = [], []
    for i, (_, attrs, low, _) in enumerate(items):
        for attr, mask in zip(attrs, low, strict=True):
            w = torch.nn.functional.adaptive_avg_pool2d(mask[None, None].float(), emb.shape[-1])
            w = w[0, 0]
            feats.append((emb[i] * w).sum((1, 2)) / w.sum().clamp(min=1e-6))
            labels.append(attr)
    return torch.stack(feats), torch.tensor(labels)
