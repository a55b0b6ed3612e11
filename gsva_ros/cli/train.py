"""``gsva-ros train``: train the tiny GSVA from scratch, or fine-tune a model directory.

    gsva-ros train --data data/synth-train --config tiny --out runs/tiny
    gsva-ros train --data refer_seg/grefcoco --images coco/train2014 \
        --config models/gsva-7b --out runs/ft
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="train the tiny GSVA or fine-tune a model (LoRA for 7B/13B)")
    p.add_argument("--data", required=True, help="gRefCOCO-format dataset directory")
    p.add_argument("--images", default=None, help="image directory (default DATA/images)")
    p.add_argument("--split", default="train")
    p.add_argument(
        "--config",
        default="tiny",
        help="'tiny' (new model + tokenizer built from the data), a GSVAConfig .json, "
        "or a model directory to fine-tune",
    )
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-slots", type=int, default=5, help="expressions per conversation")
    p.add_argument("--min-slots", type=int, default=0,
                   help="draw each conversation's expression count uniformly from "
                        "MIN_SLOTS..MAX_SLOTS (0 = always MAX_SLOTS when the image has them, "
                        "as GSVA)")
    p.add_argument("--short-share", type=float, default=1.0,
                   help="with --min-slots: the share of conversations drawn that way; the "
                        "rest take GSVA's full draw (default 1: all)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--vocab-size", type=int, default=512, help="tiny tokenizer size")
    p.add_argument("--bce-weight", type=float, default=2.0, help="mask BCE weight (GSVA: 2)")
    p.add_argument("--dice-weight", type=float, default=0.5, help="mask DICE weight (GSVA: 0.5)")
    p.add_argument(
        "--slot-weight",
        type=float,
        default=1.0,
        help="CE weight of the [SEG]/[REJ] answer tokens relative to the others (GSVA: 1)",
    )
    p.add_argument(
        "--single-first",
        type=int,
        default=0,
        metavar="STEPS",
        help="curriculum: leave multi-target expressions out of the first STEPS steps",
    )
    p.add_argument(
        "--decoder-hold",
        type=int,
        default=0,
        metavar="STEPS",
        help="hold SAM's prompt encoder and mask decoder back for the first STEPS steps",
    )
    p.add_argument(
        "--decoder-hold-scale",
        type=float,
        default=0.0,
        help="learning-rate factor for them while held (0 = frozen)",
    )
    p.add_argument(
        "--decoder-lr-scale",
        type=float,
        default=1.0,
        help="learning-rate factor for SAM's prompt encoder and mask decoder (after any hold)",
    )
    p.add_argument(
        "--pretrain-lm",
        type=int,
        default=0,
        metavar="STEPS",
        help="text-only warm-up of a from-scratch language model before GSVA training",
    )
    p.add_argument("--pretrain-lm-lr", type=float, default=1e-3, help="its learning rate")
    p.add_argument(
        "--aux-lm",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="keep the warm-up's text objective during GSVA training with this loss weight",
    )
    p.add_argument("--aux-lm-rows", type=int, default=12, help="its text rows per step")
    p.add_argument(
        "--rej-mask-weight",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="also decode a mask at [REJ] slots and push it to empty with this BCE weight "
        "(GSVA: 0)",
    )
    p.add_argument(
        "--phrase-aux",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="loss weight of a training-only read-out of each expression's words from its "
        "mask prompt (keeps the phrase where SAM's decoder can see it)",
    )
    p.add_argument(
        "--category-aux",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="loss weight of a training-only read-out of each single target's COCO category "
        "(the synthetic scenes: its shape) from SAM's image embedding under its mask",
    )
    p.add_argument(
        "--colour-aux",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="loss weight of a training-only read-out of each single target's mean colour "
        "from SAM's image embedding under its mask (keeps colour beside --category-aux)",
    )
    p.add_argument(
        "--clip-aux",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="loss weight of the same two read-outs (shape and colour) from CLIP's projected "
        "features under each single target's mask: what the language model sees, so it can "
        "reject an absent shape",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    return p


def build_new_model(config_arg: str, sentences: list[str], vocab_size: int, seed: int):
    """A randomly initialised model and a tokenizer trained on the dataset's sentences."""
    import torch

    from gsva_ros.model.config import GSVAConfig, tiny
    from gsva_ros.model.gsva import GSVAModel
    from gsva_ros.model.tokenizer import build_tiny_tokenizer, token_ids

    tokenizer = build_tiny_tokenizer(sentences, vocab_size=vocab_size)
    config = tiny() if config_arg == "tiny" else GSVAConfig.load(config_arg)
    config.vocab_size = len(tokenizer)
    for k, v in token_ids(tokenizer).items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    return GSVAModel(config), tokenizer


def run(args: argparse.Namespace) -> int:
    import torch

    from gsva_ros.data.grefcoco import load_grefcoco
    from gsva_ros.model.checkpoint import load_checkpoint, load_tokenizer
    from gsva_ros.model.config import GSVAConfig
    from gsva_ros.model.gsva import GSVAModel
    from gsva_ros.training import TrainOptions, train

    weights = (("bce-weight", args.bce_weight), ("dice-weight", args.dice_weight))
    bad = [f"--{name} must be >= 0" for name, value in weights if value < 0]
    if args.slot_weight <= 0:
        bad.append("--slot-weight must be > 0")
    if args.aux_lm < 0:
        bad.append("--aux-lm must be >= 0")
    if args.decoder_lr_scale <= 0:
        bad.append("--decoder-lr-scale must be > 0")
    if args.rej_mask_weight < 0:
        bad.append("--rej-mask-weight must be >= 0")
    if args.phrase_aux < 0:
        bad.append("--phrase-aux must be >= 0")
    if args.category_aux < 0:
        bad.append("--category-aux must be >= 0")
    if args.colour_aux < 0:
        bad.append("--colour-aux must be >= 0")
    if args.clip_aux < 0:
        bad.append("--clip-aux must be >= 0")
    if args.max_slots < 1 or not 0 <= args.min_slots <= args.max_slots:
        bad.append("need --max-slots >= 1 and 0 <= --min-slots <= --max-slots")
    if not 0.0 <= args.short_share <= 1.0:
        bad.append("--short-share must be in [0, 1]")
    if args.aux_lm_rows < 1:
        bad.append("--aux-lm-rows must be >= 1")
    if bad:
        print("error: " + "; ".join(bad))
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    samples = load_grefcoco(args.data, split=args.split, image_dir=args.images)
    if not samples:
        print(f"error: no samples in split {args.split!r} of {args.data}")
        return 2
    out = Path(args.out)
    resume = args.resume and (out / "last" / "train_state.pt").is_file()
    if resume:  # weights and optimiser come from train_state.pt inside train()
        config = GSVAConfig.load(out / "last" / "config.json")
        model, tokenizer = GSVAModel(config), load_tokenizer(out / "last")
    elif Path(args.config).is_dir():
        model, tokenizer = load_checkpoint(args.config)
    else:
        model, tokenizer = build_new_model(
            args.config, [s.sentence for s in samples], args.vocab_size, args.seed
        )
    opts = TrainOptions(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup,
        max_slots=args.max_slots,
        min_slots=args.min_slots,
        short_share=args.short_share,
        precision=args.precision,
        save_every=args.save_every,
        seed=args.seed,
        bce_weight=args.bce_weight,
        dice_weight=args.dice_weight,
        slot_weight=args.slot_weight,
        single_first_steps=args.single_first,
        decoder_hold_steps=args.decoder_hold,
        decoder_hold_scale=args.decoder_hold_scale,
        decoder_lr_scale=args.decoder_lr_scale,
        pretrain_lm_steps=args.pretrain_lm,
        pretrain_lm_lr=args.pretrain_lm_lr,
        aux_lm_weight=args.aux_lm,
        aux_lm_rows=args.aux_lm_rows,
        phrase_weight=args.phrase_aux,
        category_weight=args.category_aux,
        colour_weight=args.colour_aux,
        clip_weight=args.clip_aux,
        rej_mask_weight=args.rej_mask_weight,
    )
    summary = train(model, tokenizer, samples, out, opts, resume=resume)
    final = summary["final"] or {}
    rows = [
        ("model", model.config.name),
        ("parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"),
        ("samples", str(len(samples))),
        ("steps", str(summary["steps"])),
        ("minutes", f"{summary['minutes']:.1f}"),
        *[(f"final {k} (ema)", f"{v:.4f}") for k, v in final.items()],
        ("saved to", summary["out"]),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
