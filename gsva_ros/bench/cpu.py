"""``gsva-ros bench cpu``: engine latency on this machine, and the same commands via ROS.

Three series of the same commands (1–3 referring expressions, cycled):

- ``engine`` — ``GSVAEngine.segment`` on a new frame each time (SAM + CLIP + prefix prefill +
  text + masks);
- ``cached`` — the same commands on one frame encoded beforehand (``encode_frame``): only the
  text and the masks are paid;
- ``node`` — the ROS node (:class:`gsva_ros.ros.node.GSVANode`) started in this process on a
  ``MultiThreadedExecutor`` thread, fed over real topics: publish a new image, wait until the
  node has it, publish the command, and measure command publish → ``Segmentation`` arrival.
  Each node command is on a new frame, so ``node_over_engine`` = node p50 / engine p50 is
  the overhead of ROS transport, image conversion and message building (target ≤ 1.10).

Latencies are wall-clock on a machine that may be shared: compare ratios, not absolutes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gsva_ros.bench.common import COMMANDS, environment, random_images, summarize
from gsva_ros.ros.wait import wait_until

DISCOVERY_TIMEOUT_S = 15.0  # Fast DDS discovery takes ~3 s on a busy machine
ANSWER_TIMEOUT_S = 120.0


class BenchError(RuntimeError):
    """The benchmark cannot run (message says why and what to do)."""


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, unit="cmd")


def resolve_bench_model(model: str) -> Path:
    from gsva_ros.engine import resolve_model_dir

    path = resolve_model_dir(model)
    if not path.is_dir():
        raise BenchError(
            f"model {model!r} not found ({path} does not exist); pass --model DIR with a model "
            f"directory (a random tiny one: gsva_ros.model.checkpoint.save_checkpoint)"
        )
    return path


def run_cpu_bench(
    model: str = "tiny",
    commands: int = 20,
    node: bool = True,
    progress: bool = True,
    image_hw: tuple[int, int] = (240, 320),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the three series → result dict (JSON-ready; see the module docstring).

    The series are interleaved (fresh i, cached i, node i, fresh i+1, …) so that all three
    see the same machine load: on a shared CPU the load changes within seconds, and a ratio
    of two series taken at different times would measure the load, not ROS. The engine keeps
    two frames (its default), so the cached frame stays cached between fresh ones.
    """
    import torch

    from gsva_ros.engine import GSVAEngine

    if commands < 1:
        raise BenchError("--commands must be at least 1")
    model_dir = resolve_bench_model(model)
    engine = GSVAEngine(str(model_dir), device="cpu")
    warm = engine.warmup()
    images = random_images(commands + 1, *image_hw, seed=0)
    texts = [COMMANDS[i % len(COMMANDS)] for i in range(commands)]
    result: dict[str, Any] = {
        "model": str(model_dir),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "image_hw": list(image_hw),
        "commands": commands,
        "warmup_s": round(warm["warmup_s"], 3),
        "environment": environment(),
    }
    harness: NodeHarness | None = None
    if node:
        try:
            harness = NodeHarness(model_dir)
            harness.start()
            harness.command(images[-1], texts[0])  # untimed: the node's first-command work
        except BenchError as exc:
            result["node_error"] = str(exc)
            log(f"node: not measured: {exc}")
            if harness is not None:
                harness.close()
            harness = None

    fresh: list[float] = []
    cached: list[float] = []
    via_node: list[float] = []
    engine.encode_frame(images[-1], "bench-cached")
    try:
        desc = "engine + node" if harness else "engine"
        for i in _progress(range(commands), commands, desc, progress):
            t = time.perf_counter()
            engine.segment(images[i], texts[i], frame_key=("bench-fresh", i))
            fresh.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            engine.segment(images[-1], texts[i], frame_key="bench-cached")
            cached.append((time.perf_counter() - t) * 1e3)
            if harness is not None:
                via_node.append(harness.command(images[i], texts[i]))
    except BenchError as exc:
        result["node_error"] = str(exc)
        log(f"node: measurement stopped: {exc}")
        via_node = []
    finally:
        if harness is not None:
            harness.close()
    result["memory"] = engine.memory_report()
    engine.close()

    e, c = summarize(fresh), summarize(cached)
    result.update(engine=e, cached=c, engine_ms_p50=e["p50"], engine_ms_p95=e["p95"],
                  cached_ms_p50=c["p50"], cached_ms_p95=c["p95"])
    result.update(node=None, node_ms_p50=None, node_ms_p95=None, node_over_engine=None)
    if via_node and len(via_node) == len(fresh):
        n = summarize(via_node)
        result.update(node=n, node_ms_p50=n["p50"], node_ms_p95=n["p95"],
                      node_over_engine=round(n["p50"] / e["p50"], 3),
                      node_over_engine_min=round(n["min"] / e["min"], 3))
    return result


class NodeHarness:
    """An in-process gsva node plus a client node, spun by a MultiThreadedExecutor thread."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.ns = f"/gsva_bench_{os.getpid()}"
        self._cond = threading.Condition()
        self._arrivals: dict[tuple[str, int], tuple[float, str]] = {}
        self._stamp = 1000
        self.context = self.executor = self.node = self.client = self.thread = None

    def start(self) -> None:
        # Keep discovery on this host: the bench's own node must not meet a robot's graph.
        os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
        try:
            import rclpy
            from rclpy.executors import MultiThreadedExecutor
            from rclpy.lifecycle import TransitionCallbackReturn
            from rclpy.parameter import Parameter
            from rclpy.qos import QoSProfile, ReliabilityPolicy
            from sensor_msgs.msg import Image
            from std_msgs.msg import String

            from gsva_ros.msg import Segmentation
            from gsva_ros.ros.conversions import rgb_to_msg
            from gsva_ros.ros.node import GSVANode
        except ImportError as exc:
            raise BenchError(f"ROS 2 node unavailable ({exc})") from exc
        self._String, self._rgb_to_msg = String, rgb_to_msg
        self.context = rclpy.Context()
        rclpy.init(args=[], context=self.context)
        params = {"model": str(self.model_dir), "device": "cpu", "publish_overlay": False}
        self.node = GSVANode(context=self.context, namespace=self.ns,
                             parameter_overrides=[Parameter(k, value=v)
                                                  for k, v in params.items()])
        self.client = rclpy.create_node("gsva_bench_client", namespace=self.ns,
                                        context=self.context)
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.client.create_subscription(Segmentation, "segmentation", self._on_result, reliable)
        self.image_pub = self.client.create_publisher(
            Image, "image", QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE))
        self.command_pub = self.client.create_publisher(String, "command", reliable)
        self.executor = MultiThreadedExecutor(num_threads=4, context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.client)
        self.thread = threading.Thread(target=self.executor.spin, name="bench-executor",
                                       daemon=True)
        self.thread.start()
        if self.node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            raise BenchError("the gsva node failed to configure (see its log)")
        if self.node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            raise BenchError("the gsva node failed to activate")
        topic = f"{self.ns}/segmentation"
        _wait(lambda: self.image_pub.get_subscription_count() > 0
              and self.command_pub.get_subscription_count() > 0
              and self.client.count_publishers(topic) > 0
              and self.node.count_subscribers(topic) > 0,
              DISCOVERY_TIMEOUT_S, "ROS discovery between the bench client and the node")

    def _on_result(self, msg) -> None:
        now = time.perf_counter()
        with self._cond:
            self._arrivals[(msg.command, msg.header.stamp.sec)] = (now, msg.error)
            self._cond.notify_all()

    def command(self, image, text: str) -> float:
        """Publish ``image`` (a new frame), wait until the node holds it, publish ``text`` →
        ms from the command's publish to the Segmentation's arrival."""
        self._stamp += 1
        stamp = self._stamp
        msg = self._rgb_to_msg(image)
        msg.header.stamp.sec, msg.header.frame_id = stamp, "bench"
        before = self.node.stats()["frames_received"]
        self.image_pub.publish(msg)
        _wait(lambda: self.node.stats()["frames_received"] > before, DISCOVERY_TIMEOUT_S,
              "the node to receive the image")
        t0 = time.perf_counter()
        self.command_pub.publish(self._String(data=text))
        key = (text, stamp)
        with self._cond:
            if not self._cond.wait_for(lambda: key in self._arrivals, timeout=ANSWER_TIMEOUT_S):
                raise BenchError(f"no Segmentation for {text!r} within {ANSWER_TIMEOUT_S} s")
            t1, error = self._arrivals.pop(key)
        if error:
            raise BenchError(f"the node answered with an error: {error}")
        return (t1 - t0) * 1e3

    def close(self) -> None:
        import rclpy

        if self.executor is not None:
            self.executor.shutdown(timeout_sec=5.0)
        for n in (self.node, self.client):
            if n is not None:
                n.destroy_node()
        if self.context is not None:
            rclpy.try_shutdown(context=self.context)
        if self.thread is not None:
            self.thread.join(timeout=5.0)
        self.executor = self.node = self.client = self.thread = self.context = None


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(predicate, timeout, what, error=BenchError)
