"""``gsva-ros convert``: turn a released GSVA ``.bin`` into a gsva_ros model directory.

Example (GSVA-7B)::

    gsva-ros convert --gsva-bin gsva-7b-ft-gres.bin --llava LLaVA-Lightning-7B-v1-1 \\
        --sam sam_vit_h_4b8939.pth --clip clip-vit-large-patch14 --out models/gsva-7b

The result loads with ``GSVAEngine("models/gsva-7b")``. See :mod:`gsva_ros.model.convert`
for the key mapping and every check that is made.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsva_ros.model.config import PRESETS  # stdlib-only module, cheap for --help

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
GEOMETRY_CHOICES = ("auto", *PRESETS)


def add_parser(subparsers, name: str = "convert") -> argparse.ArgumentParser:
    """Register the subcommand on ``subparsers`` (argparse sub-parsers action)."""
    p = subparsers.add_parser(
        name,
        help="convert an official GSVA .bin into a gsva_ros model directory",
        description=(
            "Merge the LoRA of an official GSVA checkpoint, fill frozen weights from the "
            "LLaVA / CLIP / SAM base files and write config.json + model.safetensors + "
            "tokenizer. Fails (listing the keys) on any missing, unconsumed or mis-shaped "
            "tensor."
        ),
    )
    p.add_argument(
        "--gsva-bin",
        required=True,
        type=Path,
        metavar="FILE",
        help="official checkpoint (e.g. gsva-7b-ft-gres.bin) or a folder of shards",
    )
    p.add_argument(
        "--llava",
        required=True,
        type=Path,
        metavar="DIR",
        help="LLaVA HF folder: config.json, tokenizer, LLaMA weights",
    )
    p.add_argument(
        "--sam",
        required=True,
        type=Path,
        metavar="FILE",
        help="SAM checkpoint (sam_vit_h_4b8939.pth)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument(
        "--clip",
        type=Path,
        metavar="DIR",
        help="HF openai/clip-vit-large-patch14 folder (if the .bin lacks CLIP)",
    )
    p.add_argument(
        "--lora-r",
        type=int,
        metavar="R",
        help="LoRA rank (default: 8 for 7B, 64 for 13B; 0 = file has no LoRA)",
    )
    p.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default 16)")
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="float32",
        help="stored precision (default float32, GSVA's evaluation precision)",
    )
    p.add_argument(
        "--geometry",
        choices=GEOMETRY_CHOICES,
        default="auto",
        help="model preset (default: detected from the LLaVA config.json)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    return p


def run(args: argparse.Namespace) -> int:
    """Convert; prints a summary table, or one ``error:`` line and returns 1."""
    from gsva_ros.model.convert import ConversionError, convert_official

    if args.lora_r is not None and args.lora_r < 0:
        print("gsva-ros convert: error: --lora-r must be >= 0", file=sys.stderr)
        return 2
    try:
        report = convert_official(
            args.gsva_bin,
            args.llava,
            args.sam,
            args.out,
            clip_dir=args.clip,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            geometry=None if args.geometry == "auto" else args.geometry,
            dtype=args.dtype,
            overwrite=args.overwrite,
            progress=True,
        )
    except (ConversionError, OSError) as exc:
        message = " ".join(str(exc).split())
        print(f"gsva-ros convert: error: {message}", file=sys.stderr)
        return 1
    print(report.format_table())
    return 0
