"""``gsva-ros synth``: write a procedural generalized-referring dataset in gRefCOCO format.

Example::

    gsva-ros synth --out data/synth/train --n 20000 --seed 0
    gsva-ros synth --out data/synth/val --n 500 --seed 1 --split val
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="generate synthetic referring scenes (gRefCOCO format)",
        description=(
            "Generate procedural scenes with single-, multi- and no-target referring "
            "expressions and write OUT/images, OUT/instances.json and OUT/grefs(unc).json."
        ),
    )
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, required=True, help="random seed (same seed, same data)")
    p.add_argument("--min-size", type=int, default=96, help="smallest image side (px)")
    p.add_argument("--max-size", type=int, default=640, help="largest image side (px)")
    p.add_argument("--split", default="train", help="split name stored in every ref")
    p.add_argument(
        "--expressions",
        type=int,
        nargs=2,
        default=(2, 5),
        metavar=("MIN", "MAX"),
        help="expressions per image (default 2 5)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing synthetic set")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def format_summary(summary: dict) -> str:
    """Counts per case as a small aligned table."""
    total = max(int(summary["sentences"]), 1)
    rows = [("case", "sentences", "share")]
    for case in ("single", "multi", "no-target"):
        rows.append((case, str(summary[case]), f"{100.0 * summary[case] / total:.1f}%"))
    rows.append(("total", str(summary["sentences"]), "100.0%"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        "  ".join(
            [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        )
        for r in rows
    ]
    head = (
        f"images {summary['images']}  annotations {summary['annotations']}  "
        f"refs {summary['refs']}  ({summary['seconds']:.1f} s)"
    )
    return "\n".join([head, *lines])


def run(args: argparse.Namespace) -> int:
    from gsva_ros.data.synth import generate_dataset

    try:
        summary = generate_dataset(
            args.out,
            n=args.n,
            seed=args.seed,
            min_size=args.min_size,
            max_size=args.max_size,
            split=args.split,
            expressions_per_image=tuple(args.expressions),
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as exc:
        print(f"gsva-ros synth: error: {exc}")
        return 2
    print(f"wrote {args.out}")
    print(format_summary(summary))
    return 0
