"""A rosbags typestore (ROS 2 Kilted) that also knows ``gsva_ros/msg/*``.

rosbag2 stores, per topic, the message definition text and its RIHS01 type hash. For our own
messages both are derived here from the package's ``msg/*.msg`` files, exactly as rosidl does
(the hashes equal the ones in the installed ``share/gsva_ros/msg/*.json``; a test checks it),
so a bag written by these tools plays back against the built interfaces.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

PACKAGE = "gsva_ros"
# Registration order matters: Segmentation refers to Target.
OUR_MESSAGES: tuple[str, ...] = ("Target", "Segmentation")


def _candidate_msg_dirs() -> list[Path]:
    """Where ``msg/`` may live: the source tree, the venv/prefix share dir, the ament index."""
    dirs = [Path(__file__).resolve().parents[2] / "msg"]
    dirs.append(Path(sys.prefix) / "share" / PACKAGE / "msg")
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            dirs.append(Path(prefix) / "share" / PACKAGE / "msg")
    return dirs


def find_msg_dir() -> Path:
    """The directory holding ``Target.msg`` and ``Segmentation.msg``.

    Raises FileNotFoundError naming every place that was searched.
    """
    candidates = _candidate_msg_dirs()
    for d in candidates:
        if all((d / f"{name}.msg").is_file() for name in OUR_MESSAGES):
            return d
    searched = ", ".join(str(d) for d in candidates)
    raise FileNotFoundError(f"gsva_ros msg/ definitions not found (searched {searched})")


def type_name(name: str) -> str:
    """``"Segmentation"`` → ``"gsva_ros/msg/Segmentation"``."""
    return f"{PACKAGE}/msg/{name}"


@lru_cache(maxsize=1)
def gsva_typestore() -> Typestore:
    """The ROS 2 Kilted typestore plus ``gsva_ros/msg/Target`` and ``Segmentation`` (cached)."""
    store = get_typestore(Stores.ROS2_KILTED)
    msg_dir = find_msg_dir()
    for name in OUR_MESSAGES:
        text = (msg_dir / f"{name}.msg").read_text(encoding="utf-8")
        store.register(get_types_from_msg(text, type_name(name)))
    return store


def definition(msgtype: str) -> tuple[str, str]:
    """``(message definition text, RIHS01 hash)`` of ``msgtype`` as rosbag2 stores them.

    Raises KeyError for a type the typestore does not know.
    """
    store = gsva_typestore()
    if msgtype not in store.types:
        raise KeyError(msgtype)
    msgdef, _ = store.generate_msgdef(msgtype, ros_version=2)
    return msgdef, store.hash_rihs01(msgtype)
