"""Entry points, the standard launch file and the shipped parameter file.

``launch``/``launch_ros`` are not installable from PyPI wheels, so the launch file is checked
statically (``ast``) instead of being run against a fake launch API.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("gsva_ros.msg", reason="interfaces not built: run `make setup`")

from gsva_ros.ros.node import (  # noqa: E402
    NODE_NAME,
    PARAMETERS,
    GSVANode,
    validate_parameters,
)
from gsva_ros.ros.params import load_node_parameters  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LAUNCH_FILE = REPO / "launch" / "gsva.launch.py"
PARAMS_FILE = REPO / "config" / "gsva.yaml"
EXPECTED_LAUNCH_ARGUMENTS = {
    "namespace", "params_file", "model", "device", "image_topic", "command_topic",
    "use_sim_time", "log_level",
}


def run_script(script: str, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess:
    """Run scripts/<script> with this interpreter (the venv's), as `ros2 run` would."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


# --------------------------------------------------------------------------- plain node main()
def test_plain_node_exits_non_zero_with_a_clear_message_on_a_missing_model(tmp_path):
    missing = tmp_path / "no_such_model"
    proc = run_script("gsva_node", "--ros-args", "-p", f"model:={missing}", "-p", "device:=cpu")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "cannot load model" in proc.stderr and str(missing) in proc.stderr
    assert "configure failed" in proc.stderr


def test_plain_node_rejects_invalid_parameter_values_at_start():
    proc = run_script("gsva_node", "--ros-args", "-p", "mode:=sometimes")
    assert proc.returncode == 1
    assert "invalid parameter mode: must be one of once, continuous" in proc.stderr
    proc = run_script("gsva_node", "--ros-args", "-p", "max_expressions:=many")
    assert proc.returncode == 2 and "invalid parameter" in proc.stderr


def test_lifecycle_node_waits_unconfigured_and_exits_cleanly_on_sigint():
    env = dict(os.environ, RCUTILS_LOGGING_BUFFERED_STREAM="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "gsva_lifecycle_node"), "--ros-args",
         "-r", "__ns:=/entrypoint_test", "-p", "model:=/does/not/matter"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "is unconfigured" in line:
                break
        assert any("/entrypoint_test/gsva is unconfigured" in x for x in lines), lines
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- CLI
def test_cli_node_help_and_argument_split(capsys):
    from gsva_ros.cli import node as cli_node

    with pytest.raises(SystemExit) as info:
        cli_node.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--ros-args" in out and "--lifecycle" in out
    with pytest.raises(SystemExit) as info:
        cli_node.main(["--bogus"])
    assert info.value.code == 2


def test_cli_node_registers_as_a_subcommand():
    import argparse

    from gsva_ros.cli import node as cli_node

    parser = argparse.ArgumentParser(prog="gsva-ros")
    sub = parser.add_subparsers(dest="command")
    cli_node.add_parser(sub, "node")
    args = parser.parse_args(["node", "--lifecycle", "--ros-args", "-p", "model:=tiny"])
    assert args.lifecycle and args.ros_args == ["-p", "model:=tiny"]
    assert callable(cli_node.run)


# --------------------------------------------------------------------------- parameter file
def load_params_file() -> dict:
    data = yaml.safe_load(PARAMS_FILE.read_text())
    assert list(data) == [NODE_NAME], "one section, the plain 'gsva: ros__parameters:' key"
    assert load_node_parameters(PARAMS_FILE) == data[NODE_NAME]["ros__parameters"]
    return data[NODE_NAME]["ros__parameters"]


def test_params_file_lists_every_declared_parameter_with_valid_default_values():
    values = load_params_file()
    assert set(values) == set(PARAMETERS)
    assert validate_parameters(values) == []
    assert values == {name: spec.default for name, spec in PARAMETERS.items()}


def test_node_defaults_are_the_engines_defaults():
    """The node passes its parameters to GSVAEngine, so a default changed in one place only
    (as min_object_area once was in three) would make the node and the tools disagree."""
    import inspect

    from gsva_ros.engine import GSVAEngine

    engine = {
        name: p.default
        for name, p in inspect.signature(GSVAEngine.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    shared = set(engine) & set(PARAMETERS)
    assert {"model", "decoding", "min_object_area", "reject_empty_masks",
            "check_generated_phrases", "presence_threshold"} <= shared
    for name in sorted(shared):
        node_default = PARAMETERS[name].default
        if name == "presence_threshold":  # the node's 0 means the engine's None: model's own
            assert (node_default, engine[name]) == (0.0, None)
        else:
            assert node_default == engine[name], name


def test_params_file_has_a_comment_for_every_parameter():
    lines = PARAMS_FILE.read_text().splitlines()
    for i, line in enumerate(lines):
        key = line.strip().split(":", 1)[0]
        if key in PARAMETERS:
            assert lines[i - 1].strip().startswith("#"), f"{key} has no comment above it"


def test_params_file_applies_to_a_namespaced_node(tmp_path):
    values = load_params_file()
    values["mode"] = "continuous"
    values["max_rate_hz"] = 7  # an int in YAML is fine for a float parameter
    custom = tmp_path / "custom.yaml"
    custom.write_text(yaml.safe_dump({NODE_NAME: {"ros__parameters": values}}))
    # what the launch file does: read the gsva section, hand it over for whatever namespace
    # (launch_ros writes a dictionary of parameters under the wildcard key)
    handed = tmp_path / "handed.yaml"
    handed.write_text(yaml.safe_dump({"/**": {"ros__parameters": load_node_parameters(custom)}}))
    custom = handed
    context = rclpy.Context()
    rclpy.init(args=["x", "--ros-args", "--params-file", str(custom), "-r", "__ns:=/robot/arm"],
               context=context)
    try:
        node = GSVANode(context=context)
        assert node.get_fully_qualified_name() == "/robot/arm/gsva"
        assert node.get_parameter("mode").value == "continuous"
        assert node.get_parameter("max_rate_hz").value == 7
        assert validate_parameters(node.parameter_values()) == []
        node.destroy_node()
    finally:
        rclpy.shutdown(context=context)


# --------------------------------------------------------------------------- launch file
def launch_tree() -> ast.Module:
    return ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", "")) == name
    ]


def keywords(call: ast.Call) -> dict[str, ast.expr]:
    return {k.arg: k.value for k in call.keywords}


def test_launch_file_defines_generate_launch_description():
    tree = launch_tree()
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    compile(tree, str(LAUNCH_FILE), "exec")


def test_launch_file_declares_exactly_the_documented_arguments():
    declared = {}
    for call in calls(launch_tree(), "DeclareLaunchArgument"):
        kw = keywords(call)
        name = call.args[0].value
        declared[name] = kw
        assert isinstance(kw.get("description"), ast.expr), f"{name} has no description"
        assert "default_value" in kw, f"{name} has no default"
    assert set(declared) == EXPECTED_LAUNCH_ARGUMENTS
    for name in ("use_sim_time", "log_level"):
        choices = ast.literal_eval(declared[name]["choices"])
        assert ast.literal_eval(declared[name]["default_value"]) in choices


def test_launch_file_reads_every_declared_argument_and_nothing_else():
    tree = launch_tree()
    used = {c.args[1].value for c in calls(tree, "_value") if isinstance(c.args[1], ast.Constant)}
    # Optional overrides are read in a loop over a literal tuple of names.
    used |= {
        e.value for f in ast.walk(tree) if isinstance(f, ast.For) and isinstance(f.iter, ast.Tuple)
        for e in f.iter.elts
    }
    assert used == EXPECTED_LAUNCH_ARGUMENTS


def test_launch_file_starts_the_installed_executable():
    (node_call,) = calls(launch_tree(), "Node")
    kw = keywords(node_call)
    assert ast.literal_eval(kw["package"]) == "gsva_ros"
    assert ast.literal_eval(kw["name"]) == NODE_NAME
    executable = ast.literal_eval(kw["executable"])
    script = REPO / "scripts" / executable
    assert script.is_file() and os.access(script, os.X_OK)
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert f"scripts/{executable}" in cmake and "lib/${PROJECT_NAME}" in cmake
    assert "<name>gsva_ros</name>" in (REPO / "package.xml").read_text()
    remapped = {e.elts[0].value for e in kw["remappings"].elts}
    assert remapped == {"image", "command"}
    assert "--log-level" in ast.unparse(kw["arguments"])
    assert "install(DIRECTORY" in cmake and "launch config" in cmake


def test_params_loader_accepts_wildcards_and_names_bad_files(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"mode": "once", "max_rate_hz": 1.0}},
                                 "/**/gsva": {"ros__parameters": {"mode": "continuous"}},
                                 "other": {"ros__parameters": {"mode": "x"}}}))
    assert load_node_parameters(f) == {"mode": "continuous", "max_rate_hz": 1.0}
    f.write_text(yaml.safe_dump({"other": {"ros__parameters": {}}}))
    with pytest.raises(ValueError, match="no 'gsva: ros__parameters:' section"):
        load_node_parameters(f)
    with pytest.raises(ValueError, match="cannot read"):
        load_node_parameters(tmp_path / "missing.yaml")
