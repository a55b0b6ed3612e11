"""Entry point of the ``gsva-ros`` console script.

Each subcommand is a module ``gsva_ros.cli.<name>`` exposing ``add_parser(subparsers)`` and
``run(args) -> int``. Modules keep heavy imports (torch, rclpy) inside ``run`` so that
``gsva-ros --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name → module under gsva_ros.cli
COMMANDS: dict[str, str] = {
    "node": "node",
    "demo": "demo",
    "segment": "segment",
    "convert": "convert",
    "synth": "synth",
    "train": "train",
    "eval": "evaluate",
    "calibrate": "calibrate",
    "replay": "replay",
    "make-bag": "make_bag",
    "bench": "bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gsva-ros", description="GSVA referring segmentation for ROS 2 robots."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"gsva_ros.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"gsva_ros.cli.{module}":
                raise
            continue  # subcommand not built yet
        p = mod.add_parser(sub, name)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `gsva-ros node --ros-args ...` hands everything after `node` to rclpy untouched.
    if argv[:1] == ["node"]:
        from gsva_ros.cli import node

        return node.main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
