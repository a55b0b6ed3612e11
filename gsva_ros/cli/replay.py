"""``gsva-ros replay``: run GSVA over a recorded bag and write a bag of results.

    gsva-ros replay --bag in_bag --out out_bag
    gsva-ros replay --bag in_bag --out out_bag --mode continuous --max-rate-hz 5 --overlay
    gsva-ros replay --bag in_bag --out out_bag --realtime --json

Lockstep (default) answers every command on the latest image at or before it, with the node's
``once``/``continuous`` and ``max_image_age_s`` rules, deterministically and as fast as the
engine allows; ``--realtime`` plays the bag into the real node at recorded speed. With a
ground-truth topic in the bag, GRES metrics are printed as ``gsva-ros eval`` prints them
(convention: ``docs/replay.md``).
"""

from __future__ import annotations

import argparse
import json
import sys

# Same defaults as the node parameters (gsva_ros.ros.node.PARAMETERS), without importing rclpy.
DEFAULT_MODE = "once"
DEFAULT_MAX_RATE_HZ = 2.0
DEFAULT_MAX_IMAGE_AGE_S = 0.0


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _presence(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 0.999:  # the node parameter's range
        raise argparse.ArgumentTypeError(f"must be in [0, 0.999], got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="replay a bag through GSVA and record the results (+ metrics)",
        description=(
            "Answer the commands of a rosbag2 bag (sqlite3 or mcap) on its camera images and "
            "write OUT: the input topics plus <command namespace>/segmentation "
            "(gsva_ros/Segmentation) and, with --overlay, <command namespace>/overlay."
        ),
    )
    p.add_argument("--bag", required=True, help="input bag (directory, .db3 or .mcap)")
    p.add_argument("--out", required=True, help="output bag directory (must not exist)")
    p.add_argument("--image-topic", default="/camera/image_raw", metavar="T",
                   help="sensor_msgs/Image topic (default /camera/image_raw)")
    p.add_argument("--command-topic", default="/gsva/command", metavar="T",
                   help="std_msgs/String topic (default /gsva/command)")
    p.add_argument("--ground-truth-topic", default="/gsva/ground_truth", metavar="T",
                   help="gsva_ros/Segmentation ground truth (default /gsva/ground_truth)")
    p.add_argument("--segmentation-topic", default=None, metavar="T",
                   help="output topic (default: <command namespace>/segmentation)")
    p.add_argument("--model", default="tiny", metavar="M", help="'tiny' or a model directory")
    p.add_argument("--realtime", action="store_true",
                   help="run the real node and play the bag into it at recorded speed")
    p.add_argument("--mode", choices=["once", "continuous"], default=DEFAULT_MODE,
                   help="node parameter 'mode' (default once)")
    p.add_argument("--max-image-age-s", type=_non_negative, default=DEFAULT_MAX_IMAGE_AGE_S,
                   help="node parameter: refuse images older than this (0 = no limit)")
    p.add_argument("--max-rate-hz", type=_non_negative, default=DEFAULT_MAX_RATE_HZ,
                   help="node parameter: continuous-mode frame rate limit (0 = none; "
                        "default 2)")
    p.add_argument("--overlay", action="store_true", help="also record the rgb8 overlay")
    p.add_argument("--decoding", choices=["slots", "generate"], default="slots")
    p.add_argument("--presence-threshold", type=_presence, default=0.0, metavar="P",
                   help="[SEG] share needed for 'present' (0 = the model's own)")
    p.add_argument("--keep-empty-masks", action="store_true",
                   help="node parameter reject_empty_masks=false: keep a [SEG] whose mask "
                        "found no object as present (GSVA's answer as is)")
    p.add_argument("--unchecked-phrases", action="store_true",
                   help="node parameter check_generated_phrases=false: with --decoding "
                        "generate, keep an answer whose slot text does not name its expression")
    p.add_argument("--protocol", choices=["strict", "lenient"], default="strict",
                   help="GRES protocol for the metrics (lenient: lockstep only)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--storage", choices=["sqlite3", "mcap"], default=None,
                   help="output storage (default: same as the input)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bag at OUT")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    return p


def options_from_args(args: argparse.Namespace) -> object:
    """argparse namespace → :class:`gsva_ros.bag.replay.ReplayOptions`."""
    from gsva_ros.bag.replay import ReplayOptions

    return ReplayOptions(
        image_topic=args.image_topic,
        command_topic=args.command_topic,
        ground_truth_topic=args.ground_truth_topic,
        segmentation_topic=args.segmentation_topic,
        overlay=args.overlay,
        mode=args.mode,
        max_rate_hz=args.max_rate_hz,
        max_image_age_s=args.max_image_age_s,
        realtime=args.realtime,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        decoding=args.decoding,
        presence_threshold=args.presence_threshold,
        reject_empty_masks=not args.keep_empty_masks,
        check_generated_phrases=not args.unchecked_phrases,
        protocol=args.protocol,
        storage=args.storage,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    from gsva_ros.bag.io import BagError
    from gsva_ros.bag.replay import format_summary, replay, summary_json
    from gsva_ros.metrics import format_table

    try:
        report = replay(args.bag, args.out, options_from_args(args))
    except BagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:  # bad option values, missing model
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # the realtime node could not start or match
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if report.model_name:
        print(f"model {report.model_name} | decoding {args.decoding} | protocol {args.protocol}")
    print(format_summary(report))
    if report.metrics is not None:
        print(format_table(report.metrics))
    if args.json:
        print(json.dumps(summary_json(report)))
    return 0
