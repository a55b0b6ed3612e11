"""rosbag2 tools for gsva_ros: read/write bags (sqlite3 and mcap), replay them through the engine
or the real node, and generate sample bags from synthetic scenes.

Pure Python on top of ``rosbags`` (no rosbag2_py, no ``ros2`` CLI). Modules:

- :mod:`gsva_ros.bag.typestore`: a rosbags typestore that knows ``gsva_ros`` messages (read
  from the package's ``msg/`` text, so bag metadata matches what rosidl generates);
- :mod:`gsva_ros.bag.io`: reader/writer wrappers (raw CDR ↔ rclpy messages, atomic output);
- :mod:`gsva_ros.bag.replay`: ``gsva-ros replay`` (lockstep and realtime);
- :mod:`gsva_ros.bag.samplebag`: ``gsva-ros make-bag`` (moving-camera synthetic scenes).
"""
