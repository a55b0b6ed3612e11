"""``gsva-ros demo`` (what ``make demo`` runs): the node answering commands from a sample bag.

    gsva-ros demo                      # embedded model 'tiny', output in out/demo/
    gsva-ros demo --model DIR          # another model directory

Steps: make a sample bag with ``make-bag`` into ``OUT_DIR/sample_bag`` if there is none; start
the real gsva node (private namespace, simulated clock from the bag); play the bag into it over
ROS topics at recorded speed; print every command with its per-target answers; write one
overlay PNG per command (``OUT_DIR/command_NN.png``) and the recorded bag
(``OUT_DIR/replay_bag``); print a summary and the GRES metrics against the bag's ground truth.

DDS traffic stays on this machine (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST``) in a private
``ROS_DOMAIN_ID`` unless those are already set.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any

DEFAULT_OUT_DIR = "out/demo"
SAMPLE_BAG = "sample_bag"
REPLAY_BAG = "replay_bag"
PNG_PREFIX = "command_"


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="run the node on a sample bag and show its answers (make demo)",
        description=(
            "Start the gsva node on the embedded model, feed it a synthetic sample bag over "
            "ROS topics, print each command's answers, write overlay PNGs and metrics."
        ),
    )
    p.add_argument("--model", default="tiny", help="'tiny' (embedded) or a model directory")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                   help=f"where the bags and PNGs go (default {DEFAULT_OUT_DIR})")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="length of a newly made sample bag (default 10)")
    p.add_argument("--fps", type=float, default=10.0, help="its frame rate (default 10)")
    p.add_argument("--seed", type=int, default=0, help="its random seed (default 0)")
    p.add_argument("--device", default="auto", help="inference device (auto, cpu, cuda)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _ros_environment() -> None:
    """Keep the demo's DDS traffic on this machine and in a domain of its own."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if "ROS_DOMAIN_ID" not in os.environ:
        # 1..101: valid on every platform and away from the shared default domain 0.
        os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 101))
    os.environ.setdefault("FASTDDS_BUILTIN_TRANSPORTS", "LARGE_DATA")  # fast large images


def _model_dir(model: str) -> Path | None:
    from gsva_ros.engine import resolve_model_dir

    path = resolve_model_dir(model)
    return path if (path / "config.json").is_file() else None


def run(args: argparse.Namespace) -> int:
    _ros_environment()
    from gsva_ros.bag.io import BagError, BagReader
    from gsva_ros.bag.replay import ReplayOptions, format_summary, replay
    from gsva_ros.bag.samplebag import IMAGE_TOPIC, plan_sample, write_sample_bag
    from gsva_ros.metrics import format_table

    model = _model_dir(args.model)
    if model is None:
        print(
            f"error: model {args.model!r} not found. The embedded model lives in models/tiny "
            f"(trained by the project; it may not exist yet): pass --model DIR with a model "
            f"directory (config.json, model.safetensors, tokenizer).",
            file=sys.stderr,
        )
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bag_path = out_dir / SAMPLE_BAG
    progress = not args.no_progress
    try:
        if not (bag_path / "metadata.yaml").is_file():
            print(f"making a sample bag in {bag_path} ({args.seconds:g} s at {args.fps:g} fps)")
            plan = plan_sample(args.seconds, args.fps, args.seed, progress=progress)
            write_sample_bag(plan, bag_path, "mcap", overwrite=True, progress=progress)
        print(f"starting the gsva node (model {model}) and playing {bag_path} into it "
              f"(ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']})")
        opts = ReplayOptions(realtime=True, model=str(model), device=args.device,
                             overwrite=True, progress=progress, keep_answers=True)
        report = replay(bag_path, out_dir / REPLAY_BAG, opts)
        with BagReader(bag_path) as bag:
            stamps = {_stamp(a.msg) for a in report.answer_log}
            frames = _frames_by_stamp(bag, IMAGE_TOPIC, stamps)
    except (BagError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    for old in out_dir.glob(f"{PNG_PREFIX}*.png"):
        old.unlink()  # PNGs of an earlier, longer run would look like answers of this one
    print()
    for i, answer in enumerate(report.answer_log):
        print(_describe(i, answer, report.bag_start))
        rgb = frames.get(_stamp(answer.msg))
        if rgb is not None:
            _write_png(out_dir / f"{PNG_PREFIX}{i:02d}.png", rgb, answer.msg)
    print()
    print(format_summary(report))
    if report.metrics is not None:
        print(format_table(report.metrics))
    print(f"overlays: {out_dir}/{PNG_PREFIX}*.png   recorded bag: {report.output}")
    return 0 if report.answers else 1


# ---------------------------------------------------------------------------------- output
def _stamp(msg: Any) -> int:
    from gsva_ros.bag.io import stamp_ns

    return stamp_ns(msg.header)


def _frames_by_stamp(bag: Any, topic: str, stamps: set[int]) -> dict[int, Any]:
    """RGB arrays of the frames whose header stamps are in ``stamps``."""
    from sensor_msgs.msg import Image

    from gsva_ros.bag.io import deserialize, stamp_ns
    from gsva_ros.ros.conversions import image_to_rgb

    frames = {}
    for m in bag.messages([topic]):
        msg = deserialize(m.raw, Image)
        stamp = stamp_ns(msg.header)
        if stamp in stamps:
            frames[stamp] = image_to_rgb(msg).copy()
    return frames


def _describe(i: int, answer: Any, t0: int) -> str:
    """``[ 1.2 s] "command"`` and one line per target (present/absent, score, objects)."""
    msg = answer.msg
    lines = [f"[{(answer.timestamp - t0) / 1e9:5.1f} s] command {i}: {msg.command!r} "
             f"({msg.latency_ms:.0f} ms)"]
    if msg.error:
        lines.append(f"    error: {msg.error}")
        return "\n".join(lines)
    gt = answer.ground_truth
    width = max((len(t.phrase) for t in msg.targets), default=0)
    for j, t in enumerate(msg.targets):
        state = "present" if t.present else "absent "
        n = len(t.objects)
        objects = f"{n} object{'s' if n != 1 else ''}" if t.present else ""
        line = f"    {t.phrase.ljust(width)}  {state}  score {t.score:.2f}  {objects:<10}"
        if gt is not None and j < len(gt.targets):
            truth = gt.targets[j].present
            line += f"  (truth: {'present' if truth else 'absent'}"
            line += ", right)" if truth == t.present else ", wrong)"
        lines.append(line.rstrip())
    return "\n".join(lines)


def _write_png(path: Path, rgb: Any, msg: Any, min_width: int = 640) -> None:
    """The frame with the node's overlay (masks, boxes, labels) and a caption band.

    Small frames are enlarged first (masks and boxes with them) so labels stay legible.
    """
    import cv2
    import numpy as np

    from gsva_ros.bag.messages import segmentation_to_result
    from gsva_ros.ros.conversions import PALETTE, overlay

    result = None if msg.error else segmentation_to_result(msg)
    factor = max(1, -(-min_width // rgb.shape[1]))  # ceil
    if factor > 1:
        rgb = cv2.resize(rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
        if result is not None:
            _scale_result(result, factor)
    image = overlay(rgb, result)
    font, scale, line_h = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 20
    captions: list[tuple[str, tuple[int, int, int]]] = [(msg.command, (255, 255, 255))]
    if msg.error:
        captions.append((f"error: {msg.error}", (255, 96, 96)))
    for j, t in enumerate(msg.targets):
        state = (f"present (score {t.score:.2f}, {len(t.objects)} object(s))" if t.present
                 else f"absent (score {t.score:.2f})")
        colour = PALETTE[j % len(PALETTE)] if t.present else (170, 170, 170)
        captions.append((f"{t.phrase}: {state}", tuple(int(c) for c in colour)))
    lines = [(piece, colour) for text, colour in captions
             for piece in _wrap(text, image.shape[1] - 8, font, scale)]
    band = np.full((line_h * len(lines) + 8, image.shape[1], 3), 24, dtype=np.uint8)
    for k, (text, colour) in enumerate(lines):
        cv2.putText(band, text, (4, line_h * (k + 1)), font, scale, colour, 1, cv2.LINE_AA)
    cv2.imwrite(str(path), np.concatenate([image, band], axis=0)[..., ::-1])


def _scale_result(result: Any, factor: int) -> None:
    """Enlarge masks (nearest) and boxes of a result in place."""
    import numpy as np

    from gsva_ros.result import Box

    for t in result.targets:
        if t.mask is not None:
            t.mask = np.repeat(np.repeat(t.mask, factor, axis=0), factor, axis=1)
        t.boxes = [Box(b.x_offset * factor, b.y_offset * factor, b.width * factor,
                       b.height * factor) for b in t.boxes]


def _wrap(text: str, width: int, font: int, scale: float) -> list[str]:
    """Greedy word wrap to ``width`` pixels."""
    import cv2

    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        trial = f"{current} {word}" if current else word
        if current and cv2.getTextSize(trial, font, scale, 1)[0][0] > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + [current]
