"""ROS 2 layer of gsva_ros: message conversions and the ``gsva`` node.

Nothing here is imported by ``gsva_ros.model`` or ``gsva_ros.engine``; importing this package
requires rclpy and the generated ``gsva_ros.msg`` interfaces (``make setup``).
"""
