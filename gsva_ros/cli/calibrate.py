"""``gsva-ros calibrate``: choose a model's presence threshold on held-out data.

    gsva-ros calibrate --data runs/synth-val --model runs/tiny --write
    gsva-ros calibrate --data refer_seg/grefcoco --images coco/train2014 --split val \
        --model models/gsva-7b --thresholds 0.3,0.4,0.5,0.6

A target is present when the ``[SEG]`` share of the model's ``[SEG]``/``[REJ]`` choice reaches
the threshold (0.5 = GSVA's rule). A small model's shares are not calibrated, so the best
threshold for gIoU can be far from 0.5. Run this on a validation split, never on the split the
model is reported on; ``--write`` stores the choice in the model's ``config.json``, where the
engine, the node and the tools pick it up (the node parameter ``presence_threshold`` still
overrides it).
"""

from __future__ import annotations

import argparse
import json

from gsva_ros.cli.evaluate import add_dataset_args

DEFAULT_THRESHOLDS = "0.3,0.4,0.5,0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9,0.95"


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from None
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds must be in (0, 1), got {text}")
    return sorted(set(values))


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="choose a model's presence threshold on a validation split")
    add_dataset_args(p)
    p.add_argument("--thresholds", type=_thresholds, default=_thresholds(DEFAULT_THRESHOLDS),
                   help=f"comma-separated candidates (default {DEFAULT_THRESHOLDS})")
    p.add_argument("--criterion", choices=["giou", "ciou"], default="giou",
                   help="metric to maximise")
    p.add_argument("--write", action="store_true",
                   help="store the best threshold in the model's config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    return p


def run(args: argparse.Namespace) -> int:
    from gsva_ros.cli.evaluate import dataset_args_error, engine_options, load_samples
    from gsva_ros.engine import GSVAEngine, resolve_model_dir
    from gsva_ros.evaluation import best_threshold, presence_sweep
    from gsva_ros.metrics import percent as pct
    from gsva_ros.model.config import GSVAConfig

    if error := dataset_args_error(args):
        print(f"error: {error}")
        return 2
    samples = load_samples(args)
    if not samples:
        return 2
    engine = GSVAEngine(args.model, **engine_options(args))
    before = engine.config.presence_threshold
    sweep = presence_sweep(engine, samples, args.thresholds, args.protocol, args.decoding)
    best = best_threshold(sweep, args.criterion)

    print(f"model {engine.model_name} | {len(samples)} expressions | decoding {args.decoding} | "
          f"protocol {args.protocol} | current threshold {before:g}")
    print(f"{'threshold':>9}  {'gIoU':>6}  {'cIoU':>6}  {'N-acc':>6}  {'T-acc':>6}")
    for row in sweep:
        mark = "  <- best" if row is best else ""
        print(f"{row['threshold']:>9g}  {pct(row['giou']):>6}  {pct(row['ciou']):>6}  "
              f"{pct(row['n_acc']):>6}  {pct(row['t_acc']):>6}{mark}")
    written = None
    if args.write:
        path = resolve_model_dir(args.model) / "config.json"
        config = GSVAConfig.load(path)
        config.presence_threshold = float(best["threshold"])
        config.save(path)
        written = str(path)
        print(f"wrote presence_threshold {best['threshold']:g} to {path}")
    if args.json:
        keys = ("threshold", "giou", "ciou", "n_acc", "t_acc")
        print(json.dumps({
            "best": {k: best[k] for k in keys},
            "sweep": [{k: r[k] for k in keys} for r in sweep],
            "written": written,
        }))
    return 0
