"""Fixtures for the ROS node tests: a real gsva node and a test node talking over DDS.

Everything goes through real rclpy publishers, subscriptions and service clients (no callback
is called directly). Each test module gets its own rclpy context, namespace and node, spun by
a MultiThreadedExecutor on a background thread; the node is shared by the tests of a module
because loading the model costs seconds on 2 cores.

Discovery can take ~2.7 s with Fast DDS, so every helper waits for matching (>= 5 s timeouts)
before it publishes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
pytest.importorskip("gsva_ros.msg", reason="interfaces not built: run `make setup`")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from gsva_ros.msg import Segmentation  # noqa: E402
from gsva_ros.ros.conversions import rgb_to_msg  # noqa: E402
from gsva_ros.ros.node import GSVANode  # noqa: E402
from gsva_ros.srv import Segment  # noqa: E402

MATCH_TIMEOUT_S = 10.0
ANSWER_TIMEOUT_S = 60.0  # the tiny model needs ~1 s per new frame on a busy 2-core machine


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, period: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Harness:
    """A gsva node plus a test node (publishers, subscriptions, service client)."""

    wait_until = staticmethod(wait_until)

    def __init__(self, model_dir: Path, namespace: str, params: dict[str, Any]) -> None:
        self.namespace = namespace
        self.context = rclpy.Context()
        rclpy.init(args=[], context=self.context)
        values = {"model": str(model_dir), "device": "cpu", **params}
        self.node = GSVANode(
            context=self.context,
            namespace=namespace,
            parameter_overrides=[Parameter(k, value=v) for k, v in values.items()],
        )
        self.client = rclpy.create_node("gsva_test_client", namespace=namespace,
                                        context=self.context)
        self._cond = threading.Condition()
        self.results: list[Segmentation] = []
        self.overlays: list[Image] = []
        self.diagnostics: list[DiagnosticArray] = []
        reliable = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
        self.client.create_subscription(Segmentation, "segmentation", self._on_result, reliable)
        self.client.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.overlay_sub = None
        self.image_pub = self.client.create_publisher(
            Image, "image", QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        )
        self.command_pub = self.client.create_publisher(String, "command", reliable)
        self.segment_client = self.client.create_client(Segment, f"{namespace}/gsva/segment")
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.client)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()
        self._stamp = 1000

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        assert self.node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert self.node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        self.wait_matched()

    def wait_matched(self) -> None:
        wait_until(lambda: self.image_pub.get_subscription_count() > 0, MATCH_TIMEOUT_S,
                   "the node's image subscription")
        wait_until(lambda: self.command_pub.get_subscription_count() > 0, MATCH_TIMEOUT_S,
                   "the node's command subscription")
        wait_until(lambda: self.client.count_publishers(f"{self.namespace}/segmentation") > 0
                   and self.node._seg_pub.get_subscription_count() > 0, MATCH_TIMEOUT_S,
                   "the segmentation topic")
        assert self.segment_client.wait_for_service(timeout_sec=MATCH_TIMEOUT_S)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()
        self.client.destroy_node()
        rclpy.shutdown(context=self.context)
        self._thread.join(timeout=5.0)

    def set_params(self, **values: Any) -> None:
        results = self.node.set_parameters([Parameter(k, value=v) for k, v in values.items()])
        assert all(r.successful for r in results), [r.reason for r in results]

    # ---------------------------------------------------------------- inputs
    def make_image(self, rgb: np.ndarray | None = None, frame_id: str = "camera",
                   stamp: tuple[int, int] | None = None) -> Image:
        if rgb is None:
            rgb = np.random.default_rng(self._stamp).integers(0, 255, (48, 64, 3), np.uint8)
        msg = rgb_to_msg(rgb)
        msg.header.frame_id = frame_id
        if stamp is None:
            self._stamp += 1  # unique stamps identify which frame an answer used
            stamp = (self._stamp, 0)
        msg.header.stamp.sec, msg.header.stamp.nanosec = stamp
        return msg

    def publish_image(self, msg: Image | None = None, wait: bool = True) -> Image:
        """Publish a frame and (by default) wait until the node has stored it."""
        msg = msg if msg is not None else self.make_image()
        before = self.node.stats()["frames_received"]
        self.image_pub.publish(msg)
        if wait:
            wait_until(lambda: self.node.stats()["frames_received"] > before, MATCH_TIMEOUT_S,
                       "the node to receive the image")
        return msg

    def command(self, text: str) -> None:
        self.command_pub.publish(String(data=text))

    # ---------------------------------------------------------------- outputs
    def _on_result(self, msg: Segmentation) -> None:
        with self._cond:
            self.results.append(msg)
            self._cond.notify_all()

    def _on_diag(self, msg: DiagnosticArray) -> None:
        with self._cond:
            self.diagnostics.append(msg)

    def _on_overlay(self, msg: Image) -> None:
        with self._cond:
            self.overlays.append(msg)

    def answers(self, command: str) -> list[Segmentation]:
        with self._cond:
            return [m for m in self.results if m.command == command]

    def wait_answers(self, command: str, n: int = 1,
                     timeout: float = ANSWER_TIMEOUT_S) -> list[Segmentation]:
        return wait_until(lambda: (a := self.answers(command)) and len(a) >= n and a, timeout,
                          f"{n} answer(s) to {command!r}")

    def ask(self, command: str, settle_s: float = 0.3) -> Segmentation:
        """Send a command and return its single answer (after checking no second one follows)."""
        before = len(self.answers(command))
        self.command(command)
        answer = self.wait_answers(command, before + 1)[before]
        time.sleep(settle_s)
        assert len(self.answers(command)) == before + 1, (
            "a command must get exactly one Segmentation"
        )
        return answer

    def call_segment(self, command: str, image: Image | None = None,
                     timeout: float = ANSWER_TIMEOUT_S) -> Segmentation:
        request = Segment.Request(command=command)
        if image is not None:
            request.image = image
        future = self.segment_client.call_async(request)
        wait_until(future.done, timeout, f"the ~/segment reply to {command!r}")
        return future.result().result

    def subscribe_overlay(self) -> None:
        self.overlay_sub = self.client.create_subscription(Image, "overlay", self._on_overlay, 10)
        wait_until(lambda: self.node._overlay_pub.get_subscription_count() > 0, MATCH_TIMEOUT_S,
                   "the overlay subscription to match")

    def unsubscribe_overlay(self) -> None:
        if self.overlay_sub is not None:
            self.client.destroy_subscription(self.overlay_sub)
            self.overlay_sub = None
            wait_until(lambda: self.node._overlay_pub.get_subscription_count() == 0,
                       MATCH_TIMEOUT_S, "the overlay subscription to go away")


def same_header(a: Any, b: Any) -> bool:
    return (a.frame_id, a.stamp.sec, a.stamp.nanosec) == (b.frame_id, b.stamp.sec, b.stamp.nanosec)


@pytest.fixture(scope="module")
def harness_factory(tiny_model_dir: Path, request: pytest.FixtureRequest):
    """Build harnesses for this module (closed at module end); namespace per module."""
    made: list[Harness] = []
    base = "/" + request.module.__name__.rsplit(".", 1)[-1]

    def make(params: dict[str, Any] | None = None, start: bool = True,
             model_dir: Path | None = None) -> Harness:
        h = Harness(model_dir or tiny_model_dir, f"{base}_{len(made)}", params or {})
        made.append(h)
        if start:
            h.start()
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture(scope="module")
def helpers() -> Iterable[Any]:
    """Plain helper functions for test modules (they cannot import conftest)."""

    class _Helpers:
        wait_until = staticmethod(wait_until)
        same_header = staticmethod(same_header)

    return _Helpers
