"""Launch the gsva referring-segmentation node.

    ros2 launch gsva_ros gsva.launch.py image_topic:=/camera/color/image_raw
    ros2 launch gsva_ros gsva.launch.py namespace:=arm_cam model:=/models/gsva-7b device:=cuda:0

Parameters come from ``params_file`` (default: the package's config/gsva.yaml); the ``model``
and ``device`` arguments override the file only when given (empty = keep the file's value), so
a custom params file is never silently overwritten by a launch default. Then send commands:

    ros2 topic pub --once /command std_msgs/msg/String "{data: 'the red mug and the spoon'}"
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

# (ruff's isort takes this for first-party because of the repository's launch/ folder)
from launch import LaunchContext, LaunchDescription


def _value(context: LaunchContext, name: str) -> str:
    return LaunchConfiguration(name).perform(context)


def _parameter_overrides(context: LaunchContext) -> dict:
    """Launch arguments that override the params file (use_sim_time always, others if set)."""
    overrides: dict = {"use_sim_time": _value(context, "use_sim_time").lower() == "true"}
    for name in ("model", "device"):
        value = _value(context, name)
        if value:
            overrides[name] = value
    return overrides


def _gsva_node(context: LaunchContext) -> list[Node]:
    # The params file's "gsva:" section is read here and passed as a dictionary, so it applies
    # to the node whatever the namespace (a file key only matches one fully qualified name).
    from gsva_ros.ros.params import load_node_parameters

    params = load_node_parameters(_value(context, "params_file"))
    return [
        Node(
            package="gsva_ros",
            executable="gsva_node",
            name="gsva",
            namespace=_value(context, "namespace"),
            parameters=[params, _parameter_overrides(context)],
            remappings=[
                ("image", _value(context, "image_topic")),
                ("command", _value(context, "command_topic")),
            ],
            arguments=["--ros-args", "--log-level", _value(context, "log_level")],
            output="screen",
            emulate_tty=True,
        )
    ]


def generate_launch_description() -> LaunchDescription:
    default_params = os.path.join(get_package_share_directory("gsva_ros"), "config", "gsva.yaml")
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "namespace",
                default_value="",
                description="Namespace of the gsva node; its topics and ~/segment resolve "
                "under it (run one node per camera with different namespaces).",
            ),
            DeclareLaunchArgument(
                "params_file",
                default_value=default_params,
                description="YAML file with the node parameters (section gsva: ros__parameters:).",
            ),
            DeclareLaunchArgument(
                "model",
                default_value="",
                description="Override the params file's model: a bundled name (tiny) or a "
                "model directory. Empty = keep the params file's value.",
            ),
            DeclareLaunchArgument(
                "device",
                default_value="",
                description="Override the params file's device: auto, cpu, cuda or cuda:N. "
                "Empty = keep the params file's value.",
            ),
            DeclareLaunchArgument(
                "image_topic",
                default_value="image",
                description="Camera image topic (sensor_msgs/Image), remapped to the node's "
                "'image' input, e.g. /camera/color/image_raw.",
            ),
            DeclareLaunchArgument(
                "command_topic",
                default_value="command",
                description="Command topic (std_msgs/String), remapped to the node's "
                "'command' input.",
            ),
            DeclareLaunchArgument(
                "use_sim_time",
                default_value="false",
                choices=["true", "false"],
                description="Use /clock (bag replay with --clock, simulators); also the clock "
                "that max_image_age_s is measured with.",
            ),
            DeclareLaunchArgument(
                "log_level",
                default_value="info",
                choices=["debug", "info", "warn", "error", "fatal"],
                description="Log level of the node.",
            ),
            OpaqueFunction(function=_gsva_node),
        ]
    )
