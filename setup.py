"""Python packaging for gsva_ros (the `gsva-ros` console script).

The ROS interfaces (gsva_ros.msg, gsva_ros.srv) are built by CMakeLists.txt, not here.
Dependencies are pinned in requirements.txt only; `make setup` installs them.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

_INIT = Path(__file__).resolve().parent / "gsva_ros" / "__init__.py"
_VERSION = re.search(r'^__version__ = "([^"]+)"', _INIT.read_text(), re.M).group(1)

setup(
    name="gsva_ros",
    version=_VERSION,
    description="GSVA generalized referring segmentation for ROS 2 robots",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["gsva_ros", "gsva_ros.*"]),
    install_requires=[],
    entry_points={"console_scripts": ["gsva-ros = gsva_ros.cli.main:main"]},
)
