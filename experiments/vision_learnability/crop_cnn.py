"""Is the shape visible in the pixels SAM gets? A control for the tower experiments.

Every object of a synthetic scene is cut out of the image as SAM sees it (long side 384 px),
centred in a square of 2.6 times its circumradius and resized to 32×32 — so position and scale
are taken away — and a three-layer CNN classifies its shape (4 classes). If this learns fast,
the scenes are not the problem: the towers' difficulty is learning shape at every position and
scale of a dense 1/16 grid.

``--window PX`` cuts a fixed PX-square window around each object instead (its size no longer
normalised; resized to 64×64), which keeps the scale variation but also mixes in the
neighbours, and the CNN's global pooling cannot tell which object in the window is meant.

Prints, every 100 steps, the loss and the accuracy on the objects of 300 held-out scenes
(overall and on the smaller half).
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from common import add_scene_args, optimizer_step, scene, shape_index
from torch import nn

from gsva_ros.data.synth import render

SAM_SIDE = 384
PAD = 96  # reflected border, so windows near the edge stay whole


def crops(seed: int, n: int, args: argparse.Namespace):
    """(N, 3, s, s) crops in [-0.5, 0.5], (N,) shape labels, (N,) circumradius at SAM scale."""
    images, labels, radii = [], [], []
    size = 64 if args.window else 32
    for i in range(n):
        spec = scene(seed, i, args)
        image, _ = render(spec)
        scale = SAM_SIDE / max(spec.height, spec.width)
        resized = cv2.resize(
            image, (round(spec.width * scale), round(spec.height * scale)),
            interpolation=cv2.INTER_AREA,
        )
        padded = cv2.copyMakeBorder(resized, PAD, PAD, PAD, PAD, cv2.BORDER_REFLECT)
        for obj in spec.objects:
            cx, cy = obj.cx * scale + PAD, obj.cy * scale + PAD
            half = args.window / 2 if args.window else 1.3 * obj.radius * scale
            x0, y0 = int(cx - half), int(cy - half)
            x1, y1 = int(cx + half) + 1, int(cy + half) + 1
            window = padded[y0:y1, x0:x1]
            images.append(cv2.resize(window, (size, size), interpolation=cv2.INTER_AREA))
            labels.append(shape_index(obj.shape))
            radii.append(obj.radius * scale)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - 0.5
    return x, torch.tensor(labels), torch.tensor(radii)


def cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 1, 1), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, 1, 1), nn.GELU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, 1, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, classes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scene_args(parser)
    parser.add_argument("--train-scenes", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--window", type=int, default=0, help="fixed window (px at SAM scale)")
    parser.set_defaults(lr=2e-3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x_train, y_train, _ = crops(101, args.train_scenes, args)
    x_val, y_val, r_val = crops(202, 300, args)
    small = r_val < r_val.median()
    model = cnn(4)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step, start, right = 0, time.time(), torch.zeros(0, dtype=torch.bool)
    while step < args.steps if args.steps else time.time() - start < args.secs:
        idx = torch.randint(len(x_train), (args.batch_size,))
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer_step(opt, model, loss)
        step += 1
        if step % 100 == 0:
            with torch.no_grad():
                right = model(x_val).argmax(1) == y_val
            print(
                f"step {step:5d}  loss {loss.item():.3f}  held-out {right.float().mean():.3f}  "
                f"smaller half {right[small].float().mean():.3f}",
                flush=True,
            )
    result = {
        "objects": len(x_train),
        "steps": step,
        "s_per_step": round((time.time() - start) / max(step, 1), 3),
        "held_out_acc": round(float(right.float().mean()), 3) if len(right) else None,
        "commonest_shape": round(float(torch.bincount(y_val).max() / len(y_val)), 3),
    }
    print(json.dumps({**vars(args), **result}))


if __name__ == "__main__":
    main()
