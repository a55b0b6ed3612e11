"""Packaging: ROS interfaces, console script, package.xml and where pins live."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

EXPECTED_FIELDS = {
    ("msg", "Target"): {
        "phrase": "string",
        "present": "boolean",
        "score": "float",
        "mask": "sensor_msgs/Image",
        "objects": "sequence<sensor_msgs/RegionOfInterest>",
    },
    ("msg", "Segmentation"): {
        "header": "std_msgs/Header",
        "command": "string",
        "response": "string",
        "targets": "sequence<gsva_ros/Target>",
        "error": "string",
        "latency_ms": "float",
        "note": "string",
    },
    ("srv", "Segment.Request"): {"image": "sensor_msgs/Image", "command": "string"},
    ("srv", "Segment.Response"): {"result": "gsva_ros/Segmentation"},
}


def _interface(kind: str, name: str):
    module = __import__(f"gsva_ros.{kind}", fromlist=["_"])
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize(("kind", "name"), sorted(EXPECTED_FIELDS))
def test_interface_fields(kind: str, name: str) -> None:
    fields = _interface(kind, name).get_fields_and_field_types()
    assert fields == EXPECTED_FIELDS[(kind, name)]


def test_service_response_roundtrips_through_cdr() -> None:
    """Loads the compiled type support, not only the Python classes."""
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import RegionOfInterest

    from gsva_ros.msg import Target
    from gsva_ros.srv import Segment

    response = Segment.Response()
    response.result.command = "the cup and the dog"
    response.result.latency_ms = 12.5
    target = Target(phrase="the cup", present=True, score=0.75)
    target.mask.height, target.mask.width, target.mask.encoding = 2, 3, "mono8"
    target.mask.step, target.mask.data = 3, bytes([0, 1, 1, 0, 2, 0])
    target.objects = [RegionOfInterest(x_offset=1, width=2, height=1), RegionOfInterest()]
    response.result.targets = [target, Target(phrase="the dog", present=False, score=0.5)]

    back = deserialize_message(serialize_message(response), Segment.Response)
    assert back == response
    assert back.result.targets[1].mask.height == 0


def test_package_merges_with_interfaces_outside_repo(tmp_path: Path) -> None:
    """Installed gsva_ros.msg and source gsva_ros.cli import as one package from any cwd."""
    code = "import gsva_ros.msg, gsva_ros.srv, gsva_ros.cli.main; print(gsva_ros.__path__)"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_console_script_help() -> None:
    script = VENV_BIN / "gsva-ros"
    assert script.is_file(), f"{script} missing: run `make setup`"
    proc = subprocess.run(
        [str(script), "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "gsva-ros" in proc.stdout


@pytest.mark.parametrize(
    ("script", "function"), [("gsva_node", "main"), ("gsva_lifecycle_node", "main_lifecycle")]
)
def test_ros_executables(script: str, function: str) -> None:
    path = REPO_ROOT / "scripts" / script
    assert os.access(path, os.X_OK)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env python3\n")
    assert f"from gsva_ros.ros.node import {function}\n" in text


def test_package_xml() -> None:
    from catkin_pkg.package import parse_package

    pkg = parse_package(str(REPO_ROOT / "package.xml"))  # validates format 3 and e-mails
    assert pkg.package_format == 3
    assert pkg.name == "gsva_ros"
    assert pkg.licenses == ["Apache-2.0"]
    assert pkg.get_build_type() == "ament_cmake"
    assert [g.name for g in pkg.member_of_groups] == ["rosidl_interface_packages"]
    buildtool = {d.name for d in pkg.buildtool_depends}
    assert {"ament_cmake", "ament_cmake_python", "rosidl_default_generators"} <= buildtool
    build = {d.name for d in pkg.build_depends}
    run = {d.name for d in pkg.exec_depends}
    for dep in (
        "rclpy",
        "std_msgs",
        "sensor_msgs",
        "diagnostic_msgs",
        "lifecycle_msgs",
        "builtin_interfaces",
    ):
        assert dep in build and dep in run, dep
    assert {"rosidl_default_runtime", "python3-numpy"} <= run


def test_versions_agree() -> None:
    from catkin_pkg.package import parse_package

    import gsva_ros

    assert parse_package(str(REPO_ROOT / "package.xml")).version == gsva_ros.__version__


_PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-\[\],]*\s*==\s*[0-9]")


def test_requirements_txt_is_the_only_place_with_pins() -> None:
    lines = [
        line.split("#", 1)[0].strip()
        for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
    ]
    requirements = [line for line in lines if line]
    assert requirements
    unpinned = [line for line in requirements if not _PIN.match(line)]
    assert not unpinned, f"requirements.txt entries without == pin: {unpinned}"

    candidates = ["setup.py", "setup.cfg", "pyproject.toml"]
    candidates += [p.name for p in REPO_ROOT.glob("requirements*.txt")]
    candidates += [p.name for p in REPO_ROOT.glob("constraints*.txt")]
    for name in sorted(set(candidates) - {"requirements.txt"}):
        path = REPO_ROOT / name
        if path.is_file():
            assert not _PIN.search(path.read_text()), f"{name} pins a version; use requirements.txt"
