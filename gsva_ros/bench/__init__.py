"""Benchmarks behind ``gsva-ros bench`` (``docs/benchmarks.md`` explains how to run them).

- :mod:`gsva_ros.bench.cpu`: the engine on this machine (fresh vs cached frame) and the same
  commands through the ROS node over real topics.
- :mod:`gsva_ros.bench.gpu`: a random-weight full-size GSVA (7B/13B geometry) through our
  engine against the plain transformers + segment_anything pipeline (:mod:`.plain`), in the
  same process, so both numbers come from the same GPU, driver and library versions.

Heavy imports (torch, rclpy) happen inside the functions, so importing this package is cheap.
"""
