"""``gsva-ros eval``: gIoU, cIoU, N-acc, T-acc of a model on gRefCOCO-format data.

    gsva-ros eval --data runs/synth-test --model tiny --split test
    gsva-ros eval --data refer_seg/grefcoco --images coco/train2014 --split val --model DIR --json
"""

from __future__ import annotations

import argparse
import json


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    """The data, model and decoding options ``eval`` and ``calibrate`` share."""
    p.add_argument("--data", required=True, help="gRefCOCO-format dataset directory")
    p.add_argument("--images", default=None, help="image directory (default DATA/images)")
    p.add_argument("--model", default="tiny", help="'tiny' or a model directory")
    p.add_argument("--split", default=None, help="split to use (default: all refs)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N expressions")
    p.add_argument("--decoding", choices=["slots", "generate"], default="slots")
    p.add_argument("--protocol", choices=["strict", "lenient"], default="strict")
    p.add_argument("--keep-empty-masks", action="store_true",
                   help="keep a [SEG] whose mask is empty as present (GSVA's answer as is)")
    p.add_argument("--min-object-area", type=int, default=None, metavar="PX",
                   help="node parameter min_object_area: objects smaller than this are dropped "
                        "as speckle (default: the engine's, as the node's)")
    p.add_argument("--unchecked-phrases", action="store_true",
                   help="generate: keep an answer whose slot text does not name its expression "
                        "(no fallback to slot decoding)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")


def add_parser(sub, name: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help="GRES metrics (gIoU, cIoU, N-acc, T-acc) on a dataset")
    add_dataset_args(p)
    p.add_argument("--presence-threshold", type=float, default=None, metavar="P",
                   help="[SEG] share needed for 'present' (default: the model's own)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    return p


def dataset_args_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the options :func:`add_dataset_args` added (None = nothing)."""
    if args.min_object_area is not None and args.min_object_area < 0:
        return f"--min-object-area must be >= 0, got {args.min_object_area}"
    return None


def engine_options(args: argparse.Namespace) -> dict:
    """``GSVAEngine`` keyword arguments from the options :func:`add_dataset_args` added (the
    engine's own defaults where an option is not given)."""
    options = {
        "device": args.device, "dtype": args.dtype, "decoding": args.decoding,
        "reject_empty_masks": not args.keep_empty_masks,
        "check_generated_phrases": not args.unchecked_phrases,
    }
    if args.min_object_area is not None:
        options["min_object_area"] = args.min_object_area
    return options


def load_samples(args: argparse.Namespace) -> list:
    """The expressions ``--data/--images/--split/--limit`` select (printed error when none)."""
    from gsva_ros.data.grefcoco import load_grefcoco

    samples = load_grefcoco(args.data, split=args.split, image_dir=args.images)
    if args.limit > 0:
        samples = samples[: args.limit]
    if not samples:
        print(f"error: no expressions in {args.data} (split {args.split!r})")
    return samples


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from gsva_ros.engine import GSVAEngine
    from gsva_ros.evaluation import evaluate
    from gsva_ros.metrics import format_table

    threshold = args.presence_threshold
    if threshold is not None and not 0.0 < threshold < 1.0:
        print(f"error: --presence-threshold must be in (0, 1), got {threshold}")
        return 2
    if error := dataset_args_error(args):
        print(f"error: {error}")
        return 2
    samples = load_samples(args)
    if not samples:
        return 2
    engine = GSVAEngine(args.model, presence_threshold=args.presence_threshold,
                        **engine_options(args))
    summary, stats = evaluate(engine, samples, args.protocol, args.decoding)
    lat = np.asarray(stats["latency_ms"] or [0.0])
    print(f"model {engine.model_name} | decoding {args.decoding} | protocol {args.protocol} | "
          f"presence threshold {engine.presence_threshold:g} | min object area "
          f"{engine.min_object_area} px | empty masks "
          f"{'rejected' if engine.reject_empty_masks else 'kept'}"
          + (f" | phrase check {'on' if engine.check_generated_phrases else 'off'}"
             if args.decoding == "generate" else ""))
    print(format_table(summary))
    if summary["per_kind"]:  # the data names each sentence's kind (the synthetic scenes do)
        print(format_table({k: v for k, v in summary.items() if k != "protocol"}, "per_kind"))
    print(
        f"images {stats['images']}  conversations {stats['conversations']}  "
        f"fallbacks {stats['fallbacks']} ({stats['miscopied']} for mis-copied phrases)  "
        f"latency p50 {np.percentile(lat, 50):.1f} ms  "
        f"p95 {np.percentile(lat, 95):.1f} ms"
    )
    if args.json:
        keys = ("giou", "ciou", "n_acc", "t_acc")
        out = {k: summary[k] for k in keys}
        out["per_case"] = summary["per_case"]
        out["per_kind"] = summary["per_kind"]
        out["count"] = summary["count"]  # last key, as documented
        print(json.dumps(out))
    return 0
