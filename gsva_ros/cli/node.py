"""``gsva-ros node``: run the gsva ROS 2 node (same as ``ros2 run gsva_ros gsva_node``).

Everything from ``--ros-args`` on is handed to rclpy untouched, e.g.::

    gsva-ros node --ros-args -p model:=tiny -p mode:=continuous -r image:=/camera/image_raw
    gsva-ros node --lifecycle --ros-args -r __ns:=/arm_cam

rclpy is imported only when the node runs, so ``gsva-ros --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = (
    "Run the gsva ROS 2 node: subscribes 'image' (sensor_msgs/Image) and 'command' "
    "(std_msgs/String), publishes 'segmentation' (gsva_ros/Segmentation), 'overlay' and "
    "/diagnostics, serves '~/segment'. Pass ROS arguments after --ros-args."
)
EPILOG = (
    "examples:\n"
    "  gsva-ros node --ros-args -p model:=tiny -r image:=/camera/color/image_raw\n"
    "  gsva-ros node --ros-args --params-file config/gsva.yaml\n"
    "  gsva-ros node --lifecycle   # wait for configure/activate from a lifecycle manager"
)


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--lifecycle",
        action="store_true",
        help="start unconfigured and wait for lifecycle transitions (default: configure and "
        "activate at once, exit 1 if the model cannot be loaded)",
    )
    # An option with REMAINDER takes everything after it verbatim (a REMAINDER positional
    # would not start at an argument beginning with "-").
    parser.add_argument(
        "--ros-args",
        dest="ros_args",
        nargs=argparse.REMAINDER,
        metavar="ARG",
        help="ROS arguments, handed to rclpy: -p name:=value, -r from:=to, --params-file FILE, "
        "--log-level LEVEL",
    )
    return parser


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """Register the subcommand (for ``gsva-ros --help``; ``main.py`` dispatches ``node`` itself)."""
    return _configure(
        subparsers.add_parser(
            name,
            help="run the gsva ROS 2 node",
            description=DESCRIPTION,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )


def run(args: argparse.Namespace) -> int:
    argv = ["--lifecycle"] if args.lifecycle else []
    if args.ros_args is not None:
        argv += ["--ros-args", *args.ros_args]
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    """``gsva-ros node [--lifecycle] [--ros-args ...]`` → exit code of the node."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Our own options come before --ros-args; the rest belongs to rclpy.
    split = argv.index("--ros-args") if "--ros-args" in argv else len(argv)
    own, ros = argv[:split], argv[split:]
    parser = _configure(
        argparse.ArgumentParser(
            prog="gsva-ros node",
            description=DESCRIPTION,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    args = parser.parse_args(own)

    from gsva_ros.ros.node import main as node_main
    from gsva_ros.ros.node import main_lifecycle

    entry = main_lifecycle if args.lifecycle else node_main
    # rclpy expects argv[0] to be the program name.
    return int(entry(["gsva-ros-node", *ros]) or 0)


if __name__ == "__main__":
    sys.exit(main())
