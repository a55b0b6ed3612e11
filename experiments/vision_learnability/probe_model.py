"""How much shape and colour do a trained model's image features hold?

A linear probe (logistic regression, fitted on the objects of the first 70 % of the scenes,
scored on the rest) reads each object's shape and colour from SAM's image embedding averaged
under the object's mask, with the training objectives' own pooling
(``gsva_ros.training.pool_under_masks``); ``--tower clip``: from the projected CLIP patch
features the language model sees, averaged under the mask in CLIP's resize-and-crop geometry
(``pool_clip_under_masks``, which the ``--clip-aux`` read-outs train on).
Scenes: ``gsva-ros synth``'s generator, seed 202 (never used in training). Prints accuracy
and the commonest class's share, as JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from common import color_index, scene, shape_index

from gsva_ros.data.synth import COLORS, SHAPES, render
from gsva_ros.model.checkpoint import load_checkpoint
from gsva_ros.model.preprocess import clip_preprocess, sam_preprocess
from gsva_ros.training import pool_clip_under_masks, pool_under_masks


def clip_pooled(model, image: np.ndarray, masks: torch.Tensor) -> torch.Tensor:
    """n×H×W masks → n×C CLIP patch features (projected) averaged under each mask."""
    size = model.config.vision_image_size
    with torch.no_grad():
        feats = model.encode_clip(clip_preprocess(image, size)[None])
    every = [torch.ones(len(masks), dtype=torch.bool)]
    return pool_clip_under_masks(feats, [masks], every, size)


def features(model, n: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Pooled features (N×C), (shape, colour) labels (N×2) and each object's scene index."""
    size = model.config.sam_image_size
    feats, labels, scene_of = [], [], []
    encoder = model.visual_model.image_encoder
    for i in range(n):
        spec = scene(202, i, args)
        image, masks = render(spec)
        keep = [j for j, m in enumerate(masks) if m.any()]
        if not keep:
            continue
        gt = torch.from_numpy(np.stack([masks[j] for j in keep]))
        if args.tower == "clip":
            feats.append(clip_pooled(model, image, gt))
        else:
            pixels, resized = sam_preprocess(image, size)
            with torch.no_grad():
                emb = encoder(pixels[None])
            every = [torch.ones(len(keep), dtype=torch.bool)]
            pooled, _ = pool_under_masks(emb, pixels[None], [gt], every, [resized])
            feats.append(pooled)
        for j in keep:
            o = spec.objects[j]
            labels.append((shape_index(o.shape), color_index(o.color)))
            scene_of.append(i)
    return torch.cat(feats), torch.tensor(labels), scene_of


def probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, classes: int) -> float:
    """Held-out accuracy of a logistic regression on standardised features."""
    mu, sd = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
    x = (x - mu) / sd
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(500):
        opt.zero_grad()
        F.cross_entropy(head(x[train]), y[train]).backward()
        opt.step()
    with torch.no_grad():
        return float((head(x[~train]).argmax(1) == y[~train]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model directory (e.g. models/tiny)")
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--tower", choices=("sam", "clip"), default="sam")
    args = parser.parse_args()
    args.max_objects, args.upright, args.min_radius = 6, False, 0.0  # the generator's scenes
    torch.set_num_threads(2)
    model, _ = load_checkpoint(args.model)
    model.eval()
    x, y, scene_of = features(model, args.scenes, args)
    train = torch.tensor(scene_of) < int(0.7 * args.scenes)
    out: dict = {"model": args.model, "tower": args.tower, "objects": len(y)}
    for name, col, k in (("shape", 0, len(SHAPES)), ("colour", 1, len(COLORS))):
        held = y[~train, col]
        out[name] = round(probe(x.float(), y[:, col], train, k), 3)
        out[f"{name}_commonest"] = round(float(held.bincount().max() / len(held)), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
