"""Can the tiny CLIP tower learn *which shapes and colours are in the image* from scratch?

The tower (tiny preset geometry, optionally another image/patch size) feeds its layer −2 patch
tokens, projected, to a one-layer attention read-out with one learned query per shape and per
colour; each query says "present or not" (BCE). Reported: balanced accuracy of the shape and the
colour answers on 200 held-out scenes, after `--steps` steps (or `--secs` seconds). This
isolates the question the language model has to answer before it can reject "the purple star".
``--stem conv`` puts a convolutional stem in place of the 14×14 patchify projection (a 3×3
stride-2 convolution, then a 7×7 stride-7 one: the same 14-px grid), as the tiny SAM uses one.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import add_scene_args, color_index, optimizer_step, scene, shape_index
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from gsva_ros.data.synth import COLORS, SHAPES, render
from gsva_ros.model.config import tiny
from gsva_ros.model.preprocess import clip_preprocess

N_LABELS = len(SHAPES) + len(COLORS)


def make_split(
    seed: int, n: int, args: argparse.Namespace
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(n):
        spec = scene(seed, i, args)
        image, _ = render(spec)
        y = torch.zeros(N_LABELS)
        for obj in spec.objects:
            y[shape_index(obj.shape)] = 1
            y[len(SHAPES) + color_index(obj.color)] = 1
        out.append((clip_preprocess(image, args.size).half(), y))
    return out


class PresenceProbe(nn.Module):
    def __init__(self, size: int, patch: int) -> None:
        super().__init__()
        cfg = tiny()
        self.tower = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=cfg.vision_hidden_size,
                intermediate_size=cfg.vision_intermediate_size,
                num_hidden_layers=cfg.vision_num_hidden_layers,
                num_attention_heads=cfg.vision_num_attention_heads,
                image_size=size,
                patch_size=patch,
                hidden_act="quick_gelu",
            )
        )
        self.proj = nn.Linear(cfg.vision_hidden_size, cfg.hidden_size)
        self.queries = nn.Parameter(torch.randn(N_LABELS, cfg.hidden_size) * 0.02)
        self.attn = nn.MultiheadAttention(cfg.hidden_size, 4, batch_first=True)
        self.head = nn.Sequential(
            nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, 1)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """B×3×S×S → B×(shapes+colours) presence logits."""
        tokens = self.proj(self.tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
        read, _ = self.attn(self.queries.expand(len(pixels), -1, -1), tokens, tokens)
        return self.head(read)[..., 0]


class ConvStem(nn.Sequential):
    """B×3×S×S → B×C×S/14×S/14 (14 = 2·7, so not SAM's four stride-2 convolutions).

    ``weight`` is there because transformers' CLIP embeddings read the stem's dtype from it."""

    def __init__(self, dim: int, mid: int = 32) -> None:
        super().__init__(
            nn.Conv2d(3, mid, 3, 2, 1), nn.GELU(),
            nn.Conv2d(mid, mid, 3, 1, 1), nn.GELU(),
            nn.Conv2d(mid, dim, 7, 7),
        )

    @property
    def weight(self) -> torch.Tensor:
        return self[-1].weight


def balanced_accuracy(pred: torch.Tensor, truth: torch.Tensor) -> float:
    tpr = (pred & truth).sum() / truth.sum()
    tnr = (~pred & ~truth).sum() / (~truth).sum()
    return round(float(0.5 * (tpr + tnr)), 3)


def evaluate(model: PresenceProbe, val: list) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [
                model(torch.stack([p.float() for p, _ in val[i : i + 25]]))
                for i in range(0, len(val), 25)
            ]
        )
    model.train()
    pred, truth = logits > 0, torch.stack([y for _, y in val]).bool()
    k = len(SHAPES)
    return {
        "shape": balanced_accuracy(pred[:, :k], truth[:, :k]),
        "colour": balanced_accuracy(pred[:, k:], truth[:, k:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scene_args(parser)
    parser.add_argument("--size", type=int, default=224, help="CLIP input size")
    parser.add_argument("--patch", type=int, default=14, help="CLIP patch size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stem", choices=("patchify", "conv"), default="patchify")
    args = parser.parse_args()
    if args.stem == "conv" and args.patch != 14:
        parser.error("--stem conv makes 14-px patches")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    train, val = make_split(101, 1500, args), make_split(202, 200, args)
    model = PresenceProbe(args.size, args.patch)
    if args.stem == "conv":
        # (transformers 4 nests it under .vision_model, 5 does not)
        embeddings = next(m for m in model.tower.modules() if hasattr(m, "patch_embedding"))
        embeddings.patch_embedding = ConvStem(embeddings.embed_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(0)
    step, start = 0, time.time()
    while step < args.steps if args.steps else time.time() - start < args.secs:
        batch = [train[i] for i in rng.integers(len(train), size=args.batch_size)]
        logits = model(torch.stack([p.float() for p, _ in batch]))
        loss = F.binary_cross_entropy_with_logits(logits, torch.stack([y for _, y in batch]))
        optimizer_step(opt, model, loss)
        step += 1
        if step % 150 == 0:
            print(f"step {step:5d}  loss {loss.item():.3f}  {evaluate(model, val)}", flush=True)
    result = {"steps": step, "s_per_step": round((time.time() - start) / step, 3)}
    print(json.dumps({**vars(args), **result, **evaluate(model, val)}))


if __name__ == "__main__":
    main()
