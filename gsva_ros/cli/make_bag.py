"""``gsva-ros make-bag``: a sample rosbag2 bag from synthetic moving-camera scenes.

    gsva-ros make-bag --out out/sample_bag
    gsva-ros make-bag --out /tmp/short --seconds 3 --fps 5 --seed 7 --storage sqlite3

Topics: ``/camera/image_raw`` (sensor_msgs/Image rgb8, frame_id ``camera``), ``/gsva/command``
(std_msgs/String, about once per second) and ``/gsva/ground_truth`` (gsva_ros/Segmentation,
see ``docs/replay.md``). The same arguments always give the same messages.
"""

from __future__ import annotations

import argparse
import sys


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, e.g. 320x240; got {text!r}"
        ) from None
    if min(w, h) < 64 or max(w, h) > 4096:
        raise argparse.ArgumentTypeError("each side must be in [64, 4096]")
    return w, h


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="write a sample bag (synthetic camera, commands, ground truth)",
        description=(
            "Film synthetic scenes with a moving camera and write a rosbag2 bag with "
            "/camera/image_raw, /gsva/command and /gsva/ground_truth (replay it with "
            "`gsva-ros replay`)."
        ),
    )
    p.add_argument("--out", required=True, help="output bag directory (must not exist)")
    p.add_argument("--seconds", type=float, default=10.0, help="duration (default 10)")
    p.add_argument("--fps", type=float, default=10.0, help="camera frame rate (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--storage", choices=["sqlite3", "mcap"], default="mcap",
                   help="rosbag2 storage plugin (default mcap, as rosbag2 on Jazzy/Kilted)")
    p.add_argument("--size", type=_size, default=(320, 240), metavar="WxH",
                   help="frame size (default 320x240)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bag at OUT")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    from gsva_ros.bag.io import BagError, check_output_path
    from gsva_ros.bag.samplebag import plan_sample, write_sample_bag

    if args.seconds <= 0 or args.fps <= 0:
        print("error: --seconds and --fps must be positive", file=sys.stderr)
        return 2
    try:
        check_output_path(args.out, args.overwrite)
        width, height = args.size
        plan = plan_sample(args.seconds, args.fps, args.seed, width, height,
                           progress=not args.no_progress)
        stats = write_sample_bag(plan, args.out, args.storage, args.overwrite,
                                 progress=not args.no_progress)
    except BagError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(args.out, args.storage, stats))
    return 0


def format_summary(out: str, storage: str, stats: dict) -> str:
    """A short aligned table of what was written."""
    total = max(stats["expressions"], 1)
    rows = [
        ("bag", f"{out} ({storage}, {stats['bytes'] / 1e6:.1f} MB)"),
        ("frames", f"{stats['frames']} in {stats['scenes']} scene(s)"),
        ("commands", str(stats["commands"])),
        ("expressions", str(stats["expressions"])),
    ]
    rows += [
        (f"  {case}", f"{stats[case]} ({100.0 * stats[case] / total:.0f}%)")
        for case in ("single", "multi", "no-target")
    ]
    rows.append(("ground truth", f"{stats['ground_truth']} messages"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
