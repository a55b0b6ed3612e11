"""How fast does the tiny SAM image encoder learn *which shape each embedding token belongs to*?

The question behind it: ``sam_prompt.py --dense`` found that a per-token shape read-out stays at
the commonest shape's share when it is trained next to the mask loss. Here the encoder is
trained for nothing else — per-token cross-entropy over {4 shapes, background} (background
weighted 0.2, since most tokens are background) through a 1×1 read-out — so its learning curve
is the most shape the tower can pick up from scratch in a CPU budget. ``--cnn`` puts a small
convolutional network (stride 16, same output grid) in place of the ViT as a control for the
ViT's missing locality prior.

``--pooled`` asks less: only each object's embedding *averaged under its mask* must tell its
shape (a linear read-out over the 4 shapes, every object of every scene) — what the mask decoder
needs to pick "the star" out of a scene, and what a supervised pre-training of the tower would
teach. ``--stem conv`` replaces the ViT's 16×16 patchify projection by 3×3 stride-2
convolutions (the locality prior of a CNN, the ViT blocks kept).

Prints, every 50 steps, the loss and the read-out's accuracy on object tokens (``--pooled``:
objects) of 48 training scenes and of 60 held-out scenes (the commonest shape is 0.39 of
held-out object tokens, about 0.3 of objects).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import add_scene_args, add_stem_arg, optimizer_step, pooled_by_mask, set_stem
from sam_prompt import Item, make_split
from torch import nn

from gsva_ros.data.synth import SHAPES
from gsva_ros.model.config import tiny
from gsva_ros.model.gsva import build_sam


def conv_encoder(out_dim: int) -> nn.Module:
    """Four stride-2 convolutions (to the 1/16 grid of SAM's patches), then two dilated ones
    so each output cell sees the neighbouring objects' extent."""
    chans, layers, c_in = (32, 64, 64, 128), [], 3
    for c in chans:
        layers += [nn.Conv2d(c_in, c, 3, 2, 1), nn.GELU()]
        c_in = c
    layers += [nn.Conv2d(c_in, out_dim, 3, 1, 2, dilation=2), nn.GELU()]
    layers += [nn.Conv2d(out_dim, out_dim, 3, 1, 2, dilation=2)]
    return nn.Sequential(*layers)


def token_logits(encoder: nn.Module, head: nn.Module, items: list[Item]):
    """Per-token logits (B, 5, g, g) and labels (B, g, g), background = len(SHAPES)."""
    logits = head(encoder(torch.stack([b[0].float() for b in items])))
    return logits, torch.stack([b[3] for b in items])


def pooled_logits(encoder: nn.Module, head: nn.Module, items: list[Item]):
    """Per-object logits (N, 4) of the mask-averaged embedding, and the objects' shapes (N,)."""
    feats, labels = pooled_by_mask(encoder(torch.stack([b[0].float() for b in items])), items)
    return head(feats), labels[:, 0]


def accuracy(forward, encoder: nn.Module, head: nn.Module, items: list[Item]) -> float:
    """Share of object tokens (label < background), or of objects, whose shape is right."""
    encoder.eval()
    with torch.no_grad():
        logits, labels = forward(encoder, head, items)
    encoder.train()
    objects = labels < len(SHAPES)
    return float(((logits.argmax(1) == labels) & objects).sum() / objects.sum().clamp(min=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scene_args(parser)
    parser.add_argument("--train-scenes", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cnn", action="store_true", help="a small CNN in place of the ViT")
    add_stem_arg(parser)
    parser.add_argument("--pooled", action="store_true", help="classify mask-averaged objects")
    args = parser.parse_args()
    if args.cnn and args.stem != "patchify":
        parser.error("--stem changes the ViT; --cnn replaces it")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = tiny()
    train = make_split(101, args.train_scenes, args, cfg)
    val = make_split(202, 60, args, cfg)
    encoder = conv_encoder(cfg.sam_prompt_dim) if args.cnn else build_sam(cfg).image_encoder
    set_stem(encoder, args.stem, cfg.sam_embed_dim)  # patchify (the default) leaves it as is
    if args.pooled:
        forward, head = pooled_logits, nn.Linear(cfg.sam_prompt_dim, len(SHAPES))
    else:
        forward, head = token_logits, nn.Conv2d(cfg.sam_prompt_dim, len(SHAPES) + 1, 1)
    model = nn.ModuleDict({"encoder": encoder, "head": head})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    weight = None  # pooled: no background class
    if not args.pooled:
        weight = torch.ones(len(SHAPES) + 1)
        weight[-1] = 0.2
    rng = np.random.default_rng(0)
    step, start, curve = 0, time.time(), []
    while step < args.steps if args.steps else time.time() - start < args.secs:
        batch = [train[i] for i in rng.integers(len(train), size=args.batch_size)]
        logits, labels = forward(encoder, head, batch)
        loss = F.cross_entropy(logits, labels, weight=weight)
        optimizer_step(opt, model, loss)
        step += 1
        if step % 50 == 0:
            acc = accuracy(forward, encoder, head, val)
            curve.append(acc)
            print(
                f"step {step:5d}  loss {loss.item():.3f}  "
                f"train {accuracy(forward, encoder, head, train[:48]):.3f}  held-out {acc:.3f}",
                flush=True,
            )
    result = {
        "steps": step,
        "s_per_step": round((time.time() - start) / max(step, 1), 3),
        "held_out_acc": round(accuracy(forward, encoder, head, val), 3),
        # the per-50-step values are noisy; the mean of the last ten is the number to quote
        "held_out_last10_mean": round(float(np.mean(curve[-10:])), 3) if curve else None,
    }
    print(json.dumps({**vars(args), **result}))


if __name__ == "__main__":
    main()
