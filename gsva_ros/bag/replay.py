"""Replay a bag of camera frames and commands through GSVA → a bag of results (+ GRES metrics).

Two ways to run (``gsva-ros replay``):

* **lockstep** (default): deterministic and as fast as the engine allows. The bag's messages
  are walked in timestamp order on the bag's clock (inference takes no bag time) and every
  command is answered on the latest image at or before its timestamp, with the node's rules:
  ``mode`` ``once``/``continuous`` (a valid command becomes the standing command that is also
  applied to newer frames, at most ``max_rate_hz`` frames per second of bag time),
  ``max_image_age_s`` (age = command time − image header stamp), the same error texts.
  Messages are built with the node's own conversions, so they equal what the node publishes.
* **realtime** (``--realtime``): runs the real :class:`~gsva_ros.ros.node.GSVANode` (in this
  process, private namespace, ``use_sim_time`` with a ``/clock`` the player publishes) and
  plays the image and command topics into it over ROS topics at recorded speed, recording
  what it publishes.

Output: a rosbag2 (version 9) bag with all input topics copied through (unknown types too,
with their stored definitions), plus ``segmentation`` (``gsva_ros/msg/Segmentation``) and,
with ``--overlay``, ``overlay`` (rgb8), both in the command topic's namespace by default
(``/gsva/command`` → ``/gsva/segmentation``). Each answer's header is the header of the image
it used; its bag timestamp is the command's timestamp in lockstep (the time a continuous
answer was due for continuous answers) and the bag-clock receive time in realtime. The bag is
written to a hidden temporary directory and renamed on success only.

Ground-truth convention
-----------------------
An optional ``ground_truth`` topic (default ``/gsva/ground_truth``) of
``gsva_ros/msg/Segmentation``. Each message describes one (image, command) pair:

* ``header.stamp`` equals the header stamp of the image it describes;
* ``command`` equals the command string it answers (byte for byte);
* ``targets`` has one Target per referring expression, in command order: ``present`` (is
  there a target), ``mask`` a ``mono8`` image at the image size (0 = background, non-zero =
  target; label k = object k by convention; 0×0 when absent) and ``objects`` one box per
  target object, whose count decides the GRES case (0 → no-target, 1 → single, >1 → multi).

Its bag timestamp does not matter (ground truth is indexed before the replay). Every
successful answer whose (image stamp, command) has ground truth is scored with
:class:`~gsva_ros.metrics.GRESMetrics` exactly as ``gsva-ros eval`` scores an expression;
answers that are errors are counted, not scored. ``gsva-ros make-bag`` writes ground truth
for every frame a command applies to (from its frame up to and including the next
command's frame, within a scene), so continuous-mode and realtime answers are scored too.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gsva_ros.bag.io import (
    BagError,
    BagMessage,
    BagReader,
    BagWriter,
    check_output_path,
    deserialize,
    serialize,
    stamp_ns,
)
from gsva_ros.bag.messages import mask_from_msg, target_case
from gsva_ros.ros.wait import wait_until

IMAGE_TYPE = "sensor_msgs/msg/Image"
STRING_TYPE = "std_msgs/msg/String"
SEGMENTATION_TYPE = "gsva_ros/msg/Segmentation"
# Node parameter defaults (gsva_ros.ros.node.PARAMETERS; a test keeps them equal).
DEFAULT_MODE = "once"
DEFAULT_MAX_RATE_HZ = 2.0
DEFAULT_MAX_IMAGE_AGE_S = 0.0
MATCH_TIMEOUT_S = 20.0  # Fast DDS discovery sometimes takes ~3 s; be generous


@dataclass
class ReplayOptions:
    """What to replay and how (CLI flags map 1:1)."""

    image_topic: str = "/camera/image_raw"
    command_topic: str = "/gsva/command"
    ground_truth_topic: str = "/gsva/ground_truth"
    segmentation_topic: str | None = None  # None → <command namespace>/segmentation
    overlay_topic: str | None = None  # None → <command namespace>/overlay
    overlay: bool = False
    mode: str = DEFAULT_MODE
    max_rate_hz: float = DEFAULT_MAX_RATE_HZ
    max_image_age_s: float = DEFAULT_MAX_IMAGE_AGE_S
    realtime: bool = False
    model: str = "tiny"
    device: str = "auto"
    dtype: str = "auto"
    decoding: str = "slots"
    presence_threshold: float = 0.0  # 0 → the model's own
    reject_empty_masks: bool = True  # an empty [SEG] mask → absent (node parameter)
    check_generated_phrases: bool = True  # generate: mis-copied phrase → slots (node parameter)
    protocol: str = "strict"
    storage: str | None = None  # None → same as the input
    overwrite: bool = False
    progress: bool = True
    keep_answers: bool = False  # keep every answer message in the report (demo)

    def output_topic(self, name: str) -> str:
        """``segmentation``/``overlay`` in the namespace of the command topic."""
        explicit = self.segmentation_topic if name == "segmentation" else self.overlay_topic
        if explicit:
            return explicit
        ns = self.command_topic.rsplit("/", 1)[0] if "/" in self.command_topic else ""
        return f"{ns}/{name}" if ns or self.command_topic.startswith("/") else name


@dataclass
class Answer:
    """One published Segmentation: bag timestamp, message, its ground truth (if any)."""

    timestamp: int
    msg: Any
    kind: str  # "command" or "continuous" (lockstep), "published" (realtime)
    ground_truth: Any = None


@dataclass
class ReplayReport:
    """Counts, latencies and metrics of one replay."""

    input: Path
    output: Path | None
    storage: str
    realtime: bool
    mode: str
    messages_in: int = 0
    bag_start: int = 0  # first message timestamp (ns)
    images: int = 0
    commands: int = 0
    answers: int = 0
    answered: int = 0
    errors: int = 0
    continuous: int = 0
    scored_answers: int = 0
    unscored_answers: int = 0  # successful answers without ground truth
    ground_truth: int = 0  # ground-truth messages in the bag
    latencies_ms: list[float] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    topics_out: dict[str, int] = field(default_factory=dict)
    dropped_topics: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    answer_log: list[Answer] = field(default_factory=list)
    model_name: str = ""
    seconds: float = 0.0
    keep_answers: bool = False  # fill answer_log (every answer message is kept in memory)

    def latency(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None


class _Scorer:
    """Looks up ground truth for answers and accumulates GRES metrics."""

    def __init__(self, gt: dict[tuple[int, str], Any], protocol: str) -> None:
        from gsva_ros.metrics import GRESMetrics

        self.gt = gt
        self.metrics = GRESMetrics(protocol) if gt else None
        self.mismatched = 0

    def lookup(self, header_stamp: int | None, command: str) -> Any:
        if header_stamp is None:
            return None
        return self.gt.get((header_stamp, command))

    def score(self, gt: Any, preds: list[tuple[bool, np.ndarray | None]]) -> bool:
        """Add one answer's expressions (``(present, mask)`` each); False if not comparable."""
        if self.metrics is None or gt is None:
            return False
        if len(gt.targets) != len(preds):
            self.mismatched += 1
            return False
        gt_masks = [mask_from_msg(t.mask) if t.present else None for t in gt.targets]
        shapes = [m.shape for m in gt_masks if m is not None]
        shapes += [p.shape for _, p in preds if p is not None]
        shape = shapes[0] if shapes else (1, 1)
        for t, gt_mask, (present, pred) in zip(gt.targets, gt_masks, preds, strict=True):
            if gt_mask is None:
                gt_mask = np.zeros(shape, dtype=np.uint8)
            self.metrics.add(present, pred, gt_mask, target_case(t))
        return True


# ----------------------------------------------------------------------------------- helpers
def load_ground_truth(
    bag: BagReader, topic: str, notes: list[str] | None = None
) -> dict[tuple[int, str], Any]:
    """Ground-truth messages of ``topic`` keyed by ``(image header stamp ns, command)``."""
    info = bag.topics.get(topic)
    if info is None:
        return {}
    if info.msgtype != SEGMENTATION_TYPE:
        if notes is not None:
            notes.append(f"ground-truth topic {topic} has type {info.msgtype}, expected "
                         f"{SEGMENTATION_TYPE}; no metrics")
        return {}
    from gsva_ros.msg import Segmentation

    gt: dict[tuple[int, str], Any] = {}
    for m in bag.messages([topic]):
        msg = _decode(m, Segmentation)
        gt[(stamp_ns(msg.header), msg.command)] = msg
    return gt


def _decode(m: BagMessage, cls: type) -> Any:
    """Deserialize a bag message; a damaged one is a damaged bag (BagError)."""
    try:
        return deserialize(m.raw, cls)
    except Exception as exc:  # noqa: BLE001 - rclpy raises plain exceptions for bad CDR
        raise BagError(f"cannot decode the {m.msgtype} message on {m.topic} at "
                       f"{m.timestamp} ns: {exc}") from exc


def _check_topics(bag: BagReader, opts: ReplayOptions) -> tuple[bool, list[str]]:
    """Validate the input topics → (has commands, notes). Raises BagError."""
    topics = bag.topics
    listing = ", ".join(f"{t} ({i.msgtype})" for t, i in sorted(topics.items())) or "none"
    notes: list[str] = []
    image = topics.get(opts.image_topic)
    if image is None:
        raise BagError(f"image topic {opts.image_topic} is not in the bag (topics: {listing}); "
                       f"pass --image-topic")
    if image.msgtype != IMAGE_TYPE:
        raise BagError(f"image topic {opts.image_topic} has type {image.msgtype}; only "
                       f"{IMAGE_TYPE} is supported")
    command = topics.get(opts.command_topic)
    if command is not None and command.msgtype != STRING_TYPE:
        raise BagError(f"command topic {opts.command_topic} has type {command.msgtype}; "
                       f"expected {STRING_TYPE}")
    if command is None or command.count == 0:
        notes.append(f"no commands on {opts.command_topic} (topics: {listing}); the output "
                     f"holds the input topics only")
        return False, notes
    return True, notes


def _declare_outputs(
    bag: BagReader, out: BagWriter, opts: ReplayOptions, report: ReplayReport, answers: bool
) -> set[str]:
    """Declare copied input topics and (with ``answers``) our outputs → input topics to copy."""
    ours: set[str] = set()
    if answers:
        ours.add(opts.output_topic("segmentation"))
        if opts.overlay:
            ours.add(opts.output_topic("overlay"))
    copied: set[str] = set()
    for conn in bag.connections:
        if conn.topic in ours:
            if conn.topic not in report.dropped_topics:
                report.dropped_topics.append(conn.topic)
                report.notes.append(f"input topic {conn.topic} is replaced by this replay's "
                                    f"answers")
            continue
        if out.add_like(conn):
            copied.add(conn.topic)
        elif conn.topic not in report.dropped_topics:
            report.dropped_topics.append(conn.topic)
            report.notes.append(f"topic {conn.topic} ({conn.msgtype}) not copied: the bag has "
                                f"no definition of that type")
    if answers:
        out.add_topic(opts.output_topic("segmentation"), SEGMENTATION_TYPE)
        if opts.overlay:
            out.add_topic(opts.output_topic("overlay"), IMAGE_TYPE)
    return copied


def _msg_preds(msg: Any) -> list[tuple[bool, np.ndarray | None]]:
    """A recorded Segmentation's per-expression ``(present, mask)`` for scoring."""
    return [(bool(t.present), mask_from_msg(t.mask) if t.present else None) for t in msg.targets]


def _account(report: ReplayReport, scorer: _Scorer, answer: Answer,
             preds: list[tuple[bool, np.ndarray | None]] | None = None) -> None:
    """Count one answer and score it against its ground truth."""
    msg = answer.msg
    report.answers += 1
    if answer.kind == "continuous":
        report.continuous += 1
    if msg.error:
        report.errors += 1
    else:
        report.answered += 1
        report.latencies_ms.append(float(msg.latency_ms))
        gt = scorer.lookup(stamp_ns(msg.header), msg.command)
        answer.ground_truth = gt
        if scorer.score(gt, preds if preds is not None else _msg_preds(msg)):
            report.scored_answers += 1
        else:
            report.unscored_answers += 1
    if report.keep_answers:
        report.answer_log.append(answer)


# ---------------------------------------------------------------------------------- lockstep
@dataclass
class _Frame:
    key: int
    timestamp: int
    raw: bytes
    _msg: Any = None

    def msg(self) -> Any:
        """The decoded image (decoded on first use: most frames are never answered on)."""
        if self._msg is None:
            from sensor_msgs.msg import Image

            try:
                self._msg = deserialize(self.raw, Image)
            except Exception as exc:  # noqa: BLE001 - a damaged message fails one answer only
                raise _Refused(f"image message cannot be decoded: {exc}") from exc
        return self._msg


class _Lockstep:
    """The node's command/frame logic on the bag's clock (see the module docstring)."""

    def __init__(self, engine: Any, opts: ReplayOptions,
                 emit: Callable[[int, Any, str, Any, np.ndarray | None], None]) -> None:
        self.engine = engine
        self.opts = opts
        self.emit = emit  # (timestamp, msg, kind, result, rgb)
        self.latest: _Frame | None = None
        self.keys = itertools.count(1)
        self.last_used = 0
        self.standing: str | None = None
        self.next_at = 0
        self.period_ns = int(1e9 / opts.max_rate_hz) if opts.max_rate_hz > 0 else 0

    # ---------------------------------------------------------------- events
    def on_image(self, timestamp: int, raw: bytes) -> None:
        self.latest = _Frame(next(self.keys), timestamp, raw)

    def on_command(self, timestamp: int, text: str) -> None:
        self._answer(text, timestamp, None, from_topic=True)

    def _pending(self) -> bool:
        return (self.opts.mode == "continuous" and self.standing is not None
                and self.latest is not None and self.latest.key > self.last_used)

    def advance(self, now: int) -> None:
        """Run the continuous job that falls due strictly before ``now`` (if any)."""
        if self._pending() and self.next_at < now:
            self._continuous(self.next_at)

    def settle(self, now: int) -> None:
        """After the events at ``now``: a due continuous job runs at once."""
        if self._pending() and self.next_at <= now:
            self._continuous(now)

    def finish(self) -> None:
        if self._pending():
            self._continuous(max(self.next_at, self.latest.timestamp))

    def _continuous(self, now: int) -> None:
        frame = self.latest
        self.last_used = frame.key
        self.next_at = now + self.period_ns
        self._answer(self.standing, now, frame, from_topic=False)

    # ---------------------------------------------------------------- one job (node._process)
    def _answer(self, command: str, now: int, frame: _Frame | None, from_topic: bool) -> None:
        from gsva_ros.model.text import CommandError, split_command
        from gsva_ros.ros.conversions import ImageError, image_to_rgb, result_to_msg

        start = time.perf_counter()
        header = None
        rgb = None
        result = None
        error = ""
        try:
            try:
                split_command(command, self.engine.max_expressions, self.engine.max_command_chars)
            except CommandError:
                if from_topic or frame is not None:
                    self.standing = None  # an invalid command ends the standing one
                raise
            if from_topic and self.opts.mode == "continuous":
                self.standing = command
                self.next_at = now + self.period_ns
            if frame is None:
                frame = self.latest
                if frame is not None:
                    self.last_used = max(self.last_used, frame.key)
            if frame is None:
                raise _Refused(f"no image received on {self.opts.image_topic} yet")
            msg = frame.msg()
            header = msg.header
            self._check_age(header, now)
            rgb = image_to_rgb(msg)
            result = self.engine.segment(rgb, command, frame_key=frame.key,
                                         decoding=self.opts.decoding,
                                         masks_for_rejected=self.opts.protocol == "lenient")
        except (CommandError, ImageError, _Refused, ValueError) as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - model failure: report, recover, keep going
            error = f"model failure: {type(exc).__name__}: {exc}"
            self.engine.clear_cache()
        latency = (time.perf_counter() - start) * 1e3
        if error:
            result = None
        out = result_to_msg(result, header, command, error, latency)
        self.emit(now, out, "command" if from_topic else "continuous", result, rgb)

    def _check_age(self, header: Any, now: int) -> None:
        limit = float(self.opts.max_image_age_s)
        if limit <= 0:
            return
        stamp = stamp_ns(header)
        if stamp == 0:
            raise _Refused("image has no timestamp (header.stamp is 0) but max_image_age_s is set")
        age = (now - stamp) / 1e9
        if age > limit:
            raise _Refused(f"image is too old ({age:.2f} s > max_image_age_s {limit:g} s)")


class _Refused(Exception):
    """A job refused before inference (same texts as the node)."""


def _result_preds(result: Any, protocol: str) -> list[tuple[bool, np.ndarray | None]]:
    """Engine result → ``(present, mask)`` per expression, as ``gsva_ros.evaluation`` does."""
    return [
        (t.present, t.binary_mask if t.present else t.forced_mask) for t in result.targets
    ]


def _group_by_time(messages: Iterable[BagMessage]) -> Iterable[tuple[int, list[BagMessage]]]:
    for ts, group in itertools.groupby(messages, key=lambda m: m.timestamp):
        yield ts, list(group)


def _lockstep(bag: BagReader, out: BagWriter, opts: ReplayOptions, copied: set[str],
              scorer: _Scorer, report: ReplayReport, engine: Any) -> None:
    from std_msgs.msg import String
    from tqdm import tqdm

    from gsva_ros.ros.conversions import overlay, rgb_to_msg

    seg_topic = opts.output_topic("segmentation")
    ov_topic = opts.output_topic("overlay")

    def emit(ts: int, msg: Any, kind: str, result: Any, rgb: np.ndarray | None) -> None:
        out.write(seg_topic, ts, serialize(msg))
        preds = _result_preds(result, opts.protocol) if result is not None else None
        _account(report, scorer, Answer(ts, msg, kind), preds)
        if opts.overlay and result is not None and not msg.error:
            out.write(ov_topic, ts, serialize(rgb_to_msg(overlay(rgb, result), msg.header)))
        bar.set_postfix(answers=report.answers, errors=report.errors, refresh=False)

    bar = tqdm(total=bag.message_count, desc="replay", unit="msg", disable=not opts.progress)
    sim = _Lockstep(engine, opts, emit)
    for ts, group in _group_by_time(bag.messages()):
        sim.advance(ts)
        # Images first: "the latest image at or before the command" includes equal stamps.
        group.sort(key=lambda m: (m.topic == opts.command_topic, m.topic != opts.image_topic))
        for m in group:
            report.messages_in += 1
            if m.topic in copied:
                out.write(m.topic, m.timestamp, m.raw)
            if m.topic == opts.image_topic:
                report.images += 1
                sim.on_image(ts, m.raw)
            elif m.topic == opts.command_topic:
                report.commands += 1
                sim.on_command(ts, _decode(m, String).data)
        sim.settle(ts)
        bar.update(len(group))
    sim.finish()
    bar.close()


# ---------------------------------------------------------------------------------- realtime
_instance = itertools.count()


def _realtime(bag: BagReader, out: BagWriter, opts: ReplayOptions, copied: set[str],
              scorer: _Scorer, report: ReplayReport) -> None:
    """Play images and commands into a real GSVANode at recorded speed; record its output."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image
    from std_msgs.msg import String
    from tqdm import tqdm

    from gsva_ros.msg import Segmentation
    from gsva_ros.ros.node import GSVANode

    ns = f"/gsva_replay_{os.getpid()}_{next(_instance)}"
    seg_topic, ov_topic = opts.output_topic("segmentation"), opts.output_topic("overlay")
    context = rclpy.Context()
    rclpy.init(args=[], context=context)
    params = {
        "model": str(opts.model), "device": opts.device, "dtype": opts.dtype,
        "decoding": opts.decoding, "presence_threshold": float(opts.presence_threshold),
        "reject_empty_masks": bool(opts.reject_empty_masks),
        "check_generated_phrases": bool(opts.check_generated_phrases),
        "mode": opts.mode, "max_rate_hz": float(opts.max_rate_hz),
        "max_image_age_s": float(opts.max_image_age_s), "publish_overlay": bool(opts.overlay),
        "use_sim_time": True,
    }
    lock = threading.Lock()
    recorded: list[tuple[int, str, bytes]] = []
    clock = {"t0": 0.0, "bag0": 0}

    def bag_now() -> int:
        return clock["bag0"] + int((time.monotonic() - clock["t0"]) * 1e9)

    def record(topic: str) -> Callable[[bytes], None]:
        def callback(raw: bytes) -> None:
            with lock:
                recorded.append((bag_now(), topic, bytes(raw)))
        return callback

    node = player = executor = thread = None
    try:
        # The node's /clock is remapped into the private namespace: other bag players or
        # simulators on this ROS domain must not drive its clock.
        node = GSVANode(
            context=context, namespace=ns,
            parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
            cli_args=["--ros-args", "-r", f"/clock:={ns}/clock"],
        )
        player = rclpy.create_node("gsva_replay_player", namespace=ns, context=context)
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        image_pub = player.create_publisher(Image, f"{ns}/image",
                                            QoSProfile(depth=5,
                                                       reliability=ReliabilityPolicy.RELIABLE))
        command_pub = player.create_publisher(String, f"{ns}/command", reliable)
        clock_pub = player.create_publisher(Clock, f"{ns}/clock", 10)
        seg_sub = player.create_subscription(Segmentation, f"{ns}/segmentation",
                                             record(seg_topic), reliable, raw=True)
        if opts.overlay:
            player.create_subscription(Image, f"{ns}/overlay", record(ov_topic), 10, raw=True)
        executor = MultiThreadedExecutor(num_threads=4, context=context)
        executor.add_node(node)
        executor.add_node(player)
        thread = threading.Thread(target=executor.spin, name="gsva-replay", daemon=True)
        thread.start()

        if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            raise RuntimeError(f"the gsva node could not load model {opts.model!r} (see the log "
                               f"above)")
        if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            raise RuntimeError("the gsva node could not be activated")
        _wait(lambda: image_pub.get_subscription_count() > 0
              and command_pub.get_subscription_count() > 0
              and clock_pub.get_subscription_count() > 0
              and seg_sub.get_publisher_count() > 0,
              MATCH_TIMEOUT_S, "the gsva node's topics to match")

        played = [opts.image_topic, opts.command_topic]
        total = sum(bag.topics[t].count for t in played if t in bag.topics)
        bar = tqdm(total=total, desc="replay (realtime)", unit="msg", disable=not opts.progress)
        sent = 0
        for m in bag.messages(played):
            if clock["t0"] == 0.0:
                clock["t0"], clock["bag0"] = time.monotonic(), m.timestamp
            delay = clock["t0"] + (m.timestamp - clock["bag0"]) / 1e9 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sec, nsec = divmod(m.timestamp, 1_000_000_000)
            stamp = Clock()
            stamp.clock.sec, stamp.clock.nanosec = sec, nsec
            clock_pub.publish(stamp)
            if m.topic == opts.image_topic:
                image_pub.publish(m.raw)
                report.images += 1
            else:
                command_pub.publish(m.raw)
                report.commands += 1
                sent += 1
            bar.update(1)
        bar.close()
        _wait_for_answers(node, recorded, lock, sent, opts, report)
        report.notes.extend(_stats_notes(node.stats()))
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=5.0)
        for n in (node, player):
            if n is not None:
                n.destroy_node()
        rclpy.try_shutdown(context=context)
        if thread is not None:
            thread.join(timeout=5.0)

    # Inputs and recorded outputs, merged in timestamp order.
    with lock:
        outputs = sorted(recorded, key=lambda r: r[0])
    seg_cls = Segmentation
    it = iter(outputs)
    pending = next(it, None)
    for m in bag.messages():
        while pending is not None and pending[0] < m.timestamp:
            _write_recorded(out, pending, seg_topic, seg_cls, scorer, report)
            pending = next(it, None)
        report.messages_in += 1
        if m.topic in copied:
            out.write(m.topic, m.timestamp, m.raw)
    while pending is not None:
        _write_recorded(out, pending, seg_topic, seg_cls, scorer, report)
        pending = next(it, None)


def _write_recorded(out: BagWriter, rec: tuple[int, str, bytes], seg_topic: str, seg_cls: type,
                    scorer: _Scorer, report: ReplayReport) -> None:
    ts, topic, raw = rec
    out.write(topic, ts, raw)
    if topic == seg_topic:
        _account(report, scorer, Answer(ts, deserialize(raw, seg_cls), "published"))


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(predicate, timeout, what, error=RuntimeError)


def _wait_for_answers(node: Any, recorded: list, lock: threading.Lock, sent: int,
                      opts: ReplayOptions, report: ReplayReport) -> None:
    """Wait until every command is answered, the queue is empty and the output is quiet."""
    def published() -> int:
        s = node.stats()
        return int(s["commands_answered"]) + int(s["commands_errored"])

    def received() -> int:
        with lock:
            return len(recorded)

    deadline = time.monotonic() + max(60.0, 30.0 * sent)
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        stats = node.stats()
        total = published()
        if total != last:
            last, quiet_since = total, time.monotonic()
        done = total >= sent and stats["queue_depth"] == 0 and received() >= total
        # Continuous mode may still owe the newest frame an answer: wait for a quiet spell
        # longer than an inference takes.
        lat = stats["latency_p95_ms"] / 1e3
        quiet = 0.3 if opts.mode == "once" else max(2.0, 2.0 * lat)
        if done and time.monotonic() - quiet_since >= quiet:
            return
        time.sleep(0.05)
    report.notes.append(f"stopped waiting for answers after {max(60.0, 30.0 * sent):.0f} s "
                        f"({published()} published for {sent} commands)")


def _stats_notes(stats: dict[str, Any]) -> list[str]:
    notes = []
    if stats.get("dropped_frames"):
        notes.append(f"the node dropped {stats['dropped_frames']} frame(s) it could not keep "
                     f"up with (continuous mode)")
    return notes


# -------------------------------------------------------------------------------------- API
def replay(bag_path: str | os.PathLike, out_path: str | os.PathLike,
           opts: ReplayOptions | None = None, engine: Any = None) -> ReplayReport:
    """Replay ``bag_path`` into a new bag ``out_path`` (see the module docstring).

    ``engine`` (lockstep only) reuses an existing :class:`~gsva_ros.engine.GSVAEngine`;
    otherwise one is built from ``opts.model``/``device``/``dtype``. Raises :class:`BagError`
    for unreadable or unsuitable input and unwritable output (nothing is left at
    ``out_path``), RuntimeError when the realtime node cannot run.
    """
    opts = opts or ReplayOptions()
    if opts.mode not in ("once", "continuous"):
        raise ValueError(f"mode must be once or continuous, got {opts.mode!r}")
    if opts.max_rate_hz < 0 or opts.max_image_age_s < 0:
        raise ValueError("max_rate_hz and max_image_age_s must be >= 0")
    if opts.realtime and opts.protocol != "strict":
        raise ValueError("--realtime scores with the strict protocol only (the node does not "
                         "publish masks of rejected targets)")
    start = time.perf_counter()
    out_path = check_output_path(out_path, opts.overwrite)
    with BagReader(bag_path) as bag:
        has_commands, notes = _check_topics(bag, opts)
        storage = opts.storage or bag.storage
        report = ReplayReport(Path(bag_path), None, storage, opts.realtime, opts.mode,
                              notes=notes, keep_answers=opts.keep_answers)
        gt = load_ground_truth(bag, opts.ground_truth_topic, report.notes)
        report.ground_truth = len(gt)
        report.bag_start = bag.start_time if bag.message_count else 0
        scorer = _Scorer(gt, opts.protocol)
        if has_commands and not opts.realtime and engine is None:
            from gsva_ros.engine import GSVAEngine

            engine = GSVAEngine(opts.model, device=opts.device, dtype=opts.dtype,
                                decoding=opts.decoding,
                                presence_threshold=opts.presence_threshold or None,
                                reject_empty_masks=opts.reject_empty_masks,
                                check_generated_phrases=opts.check_generated_phrases)
        if engine is not None:
            report.model_name = engine.model_name
        with BagWriter(out_path, storage, opts.overwrite) as out:
            copied = _declare_outputs(bag, out, opts, report, has_commands)
            if not has_commands:
                _copy_only(bag, out, copied, report, opts.progress)
            elif opts.realtime:
                _realtime(bag, out, opts, copied, scorer, report)
            else:
                _lockstep(bag, out, opts, copied, scorer, report, engine)
            report.topics_out = dict(out.counts)
        report.output = out_path
    if scorer.metrics is not None and scorer.metrics.count:
        report.metrics = scorer.metrics.summary()
    if scorer.mismatched:
        report.notes.append(f"{scorer.mismatched} answer(s) not scored: their expressions do "
                            f"not match the ground truth's targets")
    report.seconds = time.perf_counter() - start
    return report


def _copy_only(bag: BagReader, out: BagWriter, copied: set[str], report: ReplayReport,
               progress: bool) -> None:
    from tqdm import tqdm

    for m in tqdm(bag.messages(), total=bag.message_count, desc="copy", unit="msg",
                  disable=not progress):
        report.messages_in += 1
        if m.topic in copied:
            out.write(m.topic, m.timestamp, m.raw)


# ------------------------------------------------------------------------------- reporting
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def format_summary(report: ReplayReport) -> str:
    """The summary table printed by ``gsva-ros replay`` (metrics table separately)."""
    rows = [
        ("input", f"{report.input} ({report.messages_in} messages, {report.images} images)"),
        ("output", f"{report.output} ({report.storage}, "
                   f"{sum(report.topics_out.values())} messages)"),
        ("mode", f"{'realtime' if report.realtime else 'lockstep'}, {report.mode}"),
        ("commands", str(report.commands)),
        ("answers", f"{report.answers} ({report.answered} answered, {report.errors} errors"
                    + (f", {report.continuous} continuous" if report.continuous else "") + ")"),
        ("latency p50", _ms(report.latency(50))),
        ("latency p95", _ms(report.latency(95))),
        ("ground truth", f"{report.ground_truth} messages, {report.scored_answers} answers "
                         f"scored" if report.ground_truth else "none (no metrics)"),
        ("time", f"{report.seconds:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def summary_json(report: ReplayReport) -> dict[str, Any]:
    """``--json`` object: eval's keys (giou, ciou, n_acc, t_acc, per_case), replay counts,
    ``count`` (scored expressions) last."""
    m = report.metrics or {}
    out: dict[str, Any] = {k: m.get(k) for k in ("giou", "ciou", "n_acc", "t_acc")}
    out["per_case"] = m.get("per_case", {})
    out.update(
        commands=report.commands,
        answers=report.answers,
        answered=report.answered,
        errors=report.errors,
        latency_p50_ms=report.latency(50),
        latency_p95_ms=report.latency(95),
        output=str(report.output) if report.output else None,
    )
    out["count"] = m.get("count", 0)  # last key, as gsva-ros eval
    return out
