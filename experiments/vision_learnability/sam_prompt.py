"""Can the tiny SAM (image encoder + mask decoder) learn to segment "all <shape>" / "all <colour>"?

SAM of the tiny preset geometry (or the overrides given) is trained from scratch with a learned
prompt embedding per shape and per colour in place of the language model: each training image
asks for one shape present in it and one colour present in it, target = union of the matching
objects' visible masks at the low-res mask size; loss 2·BCE + 0.5·Dice as in training. Reported:
mean IoU of the shape and the colour masks on 120 held-out scenes after `--steps` steps (or `--secs`
seconds).
``--dense W`` adds a per-token shape classification loss on the image embedding, ``--pooled W``
one on each object's embedding averaged under its mask (``--pooled-colour``: and its colour);
``--stem conv`` puts 3×3 stride-2 convolutions in place of the ViT's 16×16 patchify projection.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    add_scene_args,
    add_stem_arg,
    color_index,
    optimizer_step,
    pooled_by_mask,
    scene,
    set_stem,
    shape_index,
)
from torch import nn

from gsva_ros.data.synth import COLORS, SHAPES, render
from gsva_ros.model.config import GSVAConfig, tiny
from gsva_ros.model.gsva import build_sam
from gsva_ros.model.preprocess import sam_preprocess

Item = tuple[torch.Tensor, list[tuple[int, int]], list[torch.Tensor], torch.Tensor]


def make_split(seed: int, n: int, args: argparse.Namespace, cfg: GSVAConfig) -> list[Item]:
    """Per scene: SAM pixels, (shape, colour) per object, low-res masks, per-token shape labels."""
    size, grid = cfg.sam_image_size, cfg.sam_embedding_size
    out = []
    for i in range(n):
        spec = scene(seed, i, args)
        image, masks = render(spec)
        pixels, (nh, nw) = sam_preprocess(image, size)
        low = []
        for m in masks:
            t = F.interpolate(
                torch.from_numpy(m.astype(np.float32))[None, None], (nh, nw), mode="area"
            )
            t = F.pad(t, (0, size - nw, 0, size - nh))
            low.append(F.adaptive_avg_pool2d(t, 4 * grid)[0, 0] > 0.5)
        tokens = torch.full((grid, grid), len(SHAPES), dtype=torch.long)  # background class
        attrs = [(shape_index(o.shape), color_index(o.color)) for o in spec.objects]
        if low:
            cover = torch.stack(
                [F.adaptive_avg_pool2d(m[None, None].float(), grid)[0, 0] for m in low]
            )
            best = cover.max(0)
            shapes = torch.tensor([a[0] for a in attrs])
            tokens = torch.where(best.values > 0.5, shapes[best.indices], tokens)
        out.append((pixels.half(), attrs, low, tokens))
    return out


def queries(item: Item, rng: np.random.Generator, grid: int) -> list[tuple[str, int, torch.Tensor]]:
    """One shape query and one colour query, each for a value present in the scene."""
    _, attrs, masks, _ = item
    out = []
    for kind, pos, offset in (("shape", 0, 0), ("colour", 1, len(SHAPES))):
        values = sorted({a[pos] for a in attrs})
        value = values[rng.integers(len(values))]
        target = torch.zeros(4 * grid, 4 * grid, dtype=torch.bool)
        for a, m in zip(attrs, masks, strict=True):
            if a[pos] == value:
                target |= m
        out.append((kind, offset + value, target))
    return out


class PromptedSam(nn.Module):
    def __init__(self, cfg: GSVAConfig) -> None:
        super().__init__()
        self.sam = build_sam(cfg)
        self.prompts = nn.Embedding(len(SHAPES) + len(COLORS), cfg.sam_prompt_dim)
        self.token_head = nn.Conv2d(cfg.sam_prompt_dim, len(SHAPES) + 1, 1)
        self.pooled_head = nn.Linear(cfg.sam_prompt_dim, len(SHAPES))
        self.pooled_colour_head: nn.Module | None = None  # made last: keeps the other seeds

    def decode(self, embedding: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """1×C×g×g embedding, n prompt ids → n×4g×4g mask logits."""
        pe, n, g = self.sam.prompt_encoder, len(ids), embedding.shape[-1]
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, g, g)
        low, _ = self.sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=self.prompts(torch.tensor(ids))[:, None],
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return low[:, 0]


def evaluate(model: PromptedSam, val: list[Item], grid: int) -> dict[str, float]:
    model.eval()
    ious: dict[str, list[float]] = {"shape": [], "colour": [], "token_acc": []}
    rng = np.random.default_rng(5)
    with torch.no_grad():
        for i in range(0, len(val), 8):
            batch = val[i : i + 8]
            emb = model.sam.image_encoder(torch.stack([b[0].float() for b in batch]))
            for j, item in enumerate(batch):
                qs = queries(item, rng, grid)
                pred = model.decode(emb[j : j + 1], [q[1] for q in qs]) > 0
                for (kind, _, target), p in zip(qs, pred, strict=True):
                    ious[kind].append(float((p & target).sum() / (p | target).sum().clamp(min=1)))
            labels = torch.stack([b[3] for b in batch])
            fg = labels < len(SHAPES)
            hit = (model.token_head(emb).argmax(1) == labels) & fg
            ious["token_acc"].append(float(hit.sum() / fg.sum().clamp(min=1)))
    model.train()
    return {k: round(float(np.mean(v)), 3) for k, v in ious.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scene_args(parser)
    for name in ("image-size", "patch-size", "embed-dim", "depth"):
        parser.add_argument(f"--{name}", type=int, help=f"override the tiny preset's sam_{name}")
    parser.add_argument("--global-attn", help="comma-separated global attention block indexes")
    parser.add_argument("--dense", type=float, default=0.0, help="per-token shape loss weight")
    parser.add_argument(
        "--dense-objects-only",
        action="store_true",
        help="per-token shape loss on object tokens only (background tokens ignored)",
    )
    parser.add_argument("--batch-size", type=int, default=6)
    add_stem_arg(parser)
    parser.add_argument(
        "--pooled", type=float, default=0.0, help="weight of the mask-averaged shape loss"
    )
    parser.add_argument(
        "--pooled-colour", action="store_true", help="the same loss for the colour as well"
    )
    args = parser.parse_args()
    if args.stem != "patchify" and args.patch_size not in (None, 16):
        parser.error("--stem conv makes the 1/16 grid of 16-px patches")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = tiny()
    for name in ("image_size", "patch_size", "embed_dim", "depth"):
        if getattr(args, name) is not None:
            setattr(cfg, f"sam_{name}", getattr(args, name))
    if args.global_attn:
        cfg.sam_global_attn_indexes = [int(x) for x in args.global_attn.split(",")]
    grid = cfg.sam_embedding_size
    train, val = make_split(101, 600, args, cfg), make_split(202, 120, args, cfg)
    model = PromptedSam(cfg)
    set_stem(model.sam.image_encoder, args.stem, cfg.sam_embed_dim)
    if args.pooled_colour:
        model.pooled_colour_head = nn.Linear(cfg.sam_prompt_dim, len(COLORS))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(0)
    step, start = 0, time.time()
    while step < args.steps if args.steps else time.time() - start < args.secs:
        batch = [train[i] for i in rng.integers(len(train), size=args.batch_size)]
        emb = model.sam.image_encoder(torch.stack([b[0].float() for b in batch]))
        loss = emb.new_zeros(())
        for j, item in enumerate(batch):
            qs = queries(item, rng, grid)
            logits = model.decode(emb[j : j + 1], [q[1] for q in qs])
            target = torch.stack([q[2] for q in qs]).float()
            prob, flat = logits.sigmoid().flatten(1), target.flatten(1)
            dice = 1 - (2 * (prob * flat).sum(1) + 1) / (prob.sum(1) + flat.sum(1) + 1)
            bce = F.binary_cross_entropy_with_logits(logits, target)
            loss = loss + (2 * bce + 0.5 * dice.mean()) / len(batch)
        if args.dense:
            labels = torch.stack([b[3] for b in batch])
            if args.dense_objects_only:
                labels = labels.masked_fill(labels == len(SHAPES), -100)  # CE's ignore_index
            loss = loss + args.dense * F.cross_entropy(model.token_head(emb), labels)
        if args.pooled:
            feats, attrs = pooled_by_mask(emb, batch)
            loss = loss + args.pooled * F.cross_entropy(model.pooled_head(feats), attrs[:, 0])
            if args.pooled_colour:
                colour = F.cross_entropy(model.pooled_colour_head(feats), attrs[:, 1])
                loss = loss + args.pooled * colour
        optimizer_step(opt, model, loss)
        step += 1
        if step % 200 == 0:
            print(
                f"step {step:5d}  loss {loss.item():.3f}  {evaluate(model, val, grid)}", flush=True
            )
    result = {"steps": step, "s_per_step": round((time.time() - start) / step, 3)}
    print(json.dumps({**vars(args), **result, **evaluate(model, val, grid)}))


if __name__ == "__main__":
    main()
