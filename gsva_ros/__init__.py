"""gsva_ros: generalized referring segmentation (GSVA) for ROS 2 robots.

The ROS message build installs generated code (``gsva_ros.msg``, ``gsva_ros.srv``) into
site-packages under the same package name; ``extend_path`` merges both locations so the
source tree and the generated interfaces import as one package.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
