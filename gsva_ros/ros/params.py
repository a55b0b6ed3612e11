"""Reading the node's parameter file (``config/gsva.yaml``) without the ROS launch system.

The file uses the plain ``gsva: ros__parameters:`` key. ROS matches such a key against the
fully qualified node name, so with ``--params-file`` it applies to ``/gsva`` only; the launch
file therefore reads it here and passes the values as a dictionary, which applies to the node
in whatever namespace it is started. Wildcard keys (``/**/gsva``, ``/**``) are read too, so a
user's own file in either style works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

NODE_NAME = "gsva"


def load_node_parameters(path: str | Path, node_name: str = NODE_NAME) -> dict[str, Any]:
    """``ros__parameters`` of ``node_name`` from a ROS 2 parameter YAML file.

    Sections that apply to the node (``gsva``, ``/gsva``, ``/**/gsva``, ``/**``) are merged,
    the node's own key winning over wildcards (as ROS does). Raises ValueError naming the file
    when it is unreadable or has no section for the node.
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read parameter file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"parameter file {path} is not a mapping of node names")
    merged: dict[str, Any] = {}
    found = False
    for key in ("/**", f"/**/{node_name}", f"/{node_name}", node_name):  # weakest first
        section = data.get(key)
        if isinstance(section, dict) and isinstance(section.get("ros__parameters"), dict):
            merged.update(section["ros__parameters"])
            found = True
    if not found:
        raise ValueError(f"parameter file {path} has no '{node_name}: ros__parameters:' section")
    return merged
