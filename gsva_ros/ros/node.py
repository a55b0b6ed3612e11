"""The ``gsva`` ROS 2 node: camera image + referring command → one ``Segmentation`` per command.

Interfaces (names relative to the node namespace, remap as usual):

- subscribes ``image`` (sensor_msgs/Image; QoS from ``image_qos``, depth 1) and ``command``
  (std_msgs/String; reliable, KEEP_ALL so a burst never overwrites unanswered commands);
- publishes ``segmentation`` (gsva_ros/Segmentation), ``overlay`` (rgb8, only while someone
  subscribes and ``publish_overlay`` is true) and ``/diagnostics`` (~1 Hz);
- serves ``~/segment`` (gsva_ros/Segment): request image, or the latest camera image when the
  request image is 0×0; the reply is the same message that is published on ``segmentation``.

Threading (the reason for most of the structure here): callbacks only store the newest frame
or enqueue a command and return at once; ONE worker thread runs inference. Subscriptions,
the service, the diagnostics timer, parameter and lifecycle services sit in different callback
groups of a MultiThreadedExecutor, so none of them waits behind a multi-second inference.
Only the newest frame is kept (older ones are counted as dropped), so there is never a
backlog of stale frames.

One class serves both entry points: :class:`GSVANode` is a lifecycle node (engine loaded on
configure, work only while active, engine freed on cleanup/shutdown). ``main()`` configures and
activates it itself, like a plain node; ``main_lifecycle()`` leaves that to a lifecycle
manager.

Parameters ``model``, ``device``, ``dtype`` and ``image_qos`` are applied on configure: while the
node is configured a change is rejected with a reason (run the lifecycle ``cleanup`` transition,
set them, then ``configure``/``activate`` again). All others apply at runtime.
"""

from __future__ import annotations

import math
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
)
from sensor_msgs.msg import Image
from std_msgs.msg import Header, String

from gsva_ros.model.text import CommandError, split_command
from gsva_ros.msg import Segmentation
from gsva_ros.ros.conversions import (
    ImageError,
    describe_image,
    image_to_rgb,
    is_empty_image,
    overlay,
    result_to_msg,
    rgb_to_msg,
)
from gsva_ros.srv import Segment

NODE_NAME = "gsva"
NO_IMAGE_WARN_S = 3.0  # warn about a silent image topic after this long (users hit it often)
NO_IMAGE_WARN_EVERY_S = 30.0
SERVICE_TIMEOUT_S = 300.0  # a service call never waits forever on a stuck worker
DIAGNOSTICS_PERIOD_S = 1.0
RATE_WINDOW_S = 5.0
COMMAND_QOS_DEPTH = 100
SEGMENTATION_QOS_DEPTH = 50  # a burst of immediate refusals must not evict answers


# ============================================================================ parameters
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter: default, description, validator (returns a reason or None)."""

    default: Any
    description: str
    check: Check
    constraints: str
    applied_on_configure: bool = False
    # ROS types are strict; a float parameter also accepts ints ("-p max_rate_hz:=2").
    number: bool = False


def _one_of(*choices: str) -> tuple[Check, str]:
    def check(v: Any) -> str | None:
        if not isinstance(v, str) or v not in choices:
            return f"must be one of {', '.join(choices)}; got {v!r}"
        return None

    return check, f"one of: {', '.join(choices)}"


def _int_range(lo: int, hi: int) -> tuple[Check, str]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be an integer; got {v!r}"
        if not lo <= v <= hi:
            return f"must be in [{lo}, {hi}]; got {v}"
        return None

    return check, f"integer in [{lo}, {hi}]"


def _float_range(lo: float, hi: float) -> tuple[Check, str]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int | float):
            return f"must be a number; got {v!r}"
        if not math.isfinite(v) or not lo <= v <= hi:
            return f"must be in [{lo}, {hi}]; got {v}"
        return None

    return check, f"number in [{lo}, {hi}]"


def _boolean() -> tuple[Check, str]:
    def check(v: Any) -> str | None:
        return None if isinstance(v, bool) else f"must be true or false; got {v!r}"

    return check, "true or false"


def _model() -> tuple[Check, str]:
    def check(v: Any) -> str | None:
        if not isinstance(v, str) or not v.strip():
            return f"must be a bundled model name (e.g. tiny) or a model directory; got {v!r}"
        return None

    return check, "bundled model name (tiny) or a model directory path"


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _device() -> tuple[Check, str]:
    def check(v: Any) -> str | None:
        if not isinstance(v, str) or not _DEVICE.match(v):
            return f"must be auto, cpu, cuda or cuda:N; got {v!r}"
        return None

    return check, "auto, cpu, cuda or cuda:N"


def _spec(default: Any, description: str, checker: tuple[Check, str], **kw: Any) -> ParamSpec:
    return ParamSpec(default, description, checker[0], checker[1], **kw)


PARAMETERS: dict[str, ParamSpec] = {
    "model": _spec(
        "tiny",
        "GSVA model: a bundled name (tiny) or a model directory (config.json, "
        "model.safetensors, tokenizer). Applied on configure.",
        _model(),
        applied_on_configure=True,
    ),
    "device": _spec(
        "auto", "Inference device; auto = cuda if available, else cpu. Applied on configure.",
        _device(), applied_on_configure=True,
    ),
    "dtype": _spec(
        "auto",
        "Weights/compute dtype; auto = bfloat16 (or float16) on CUDA, float32 on CPU. "
        "Applied on configure.",
        _one_of("auto", "float32", "bfloat16", "float16"),
        applied_on_configure=True,
    ),
    "decoding": _spec(
        "slots",
        "slots: one forced [SEG]/[REJ] decision per expression (fast, always one answer per "
        "expression); generate: free generation of the answer text.",
        _one_of("slots", "generate"),
    ),
    "mode": _spec(
        "once",
        "once: each command is answered once, on the latest frame. continuous: the last "
        "valid command is also applied to every new frame (rate-limited by max_rate_hz).",
        _one_of("once", "continuous"),
    ),
    "max_rate_hz": _spec(
        2.0, "Continuous mode: at most this many frames segmented per second (0 = no limit).",
        _float_range(0.0, 1000.0), number=True,
    ),
    "max_image_age_s": _spec(
        0.0,
        "Refuse camera frames whose header.stamp is older than this (node clock, so it "
        "follows use_sim_time); 0 = no limit.",
        _float_range(0.0, 1e6), number=True,
    ),
    "image_qos": _spec(
        "sensor_data",
        "Image subscription QoS: sensor_data = best effort, depth 1 (matches any publisher); "
        "reliable = reliable, depth 1 (only matches reliable publishers). Applied on configure.",
        _one_of("sensor_data", "reliable"),
        applied_on_configure=True,
    ),
    "presence_threshold": _spec(
        0.0,
        "A target is present when the [SEG] share of the model's [SEG]/[REJ] choice reaches "
        "this; higher = fewer false 'present' answers, more missed targets. 0 = the model's "
        "own value (0.5, GSVA's rule, unless the model ships a calibrated one).",
        _float_range(0.0, 0.999), number=True,
    ),
    "reject_empty_masks": _spec(
        True,
        "Report a target absent when the model answered [SEG] but its mask keeps no object "
        "of min_object_area pixels (false = GSVA's answer as is).",
        _boolean(),
    ),
    "check_generated_phrases": _spec(
        True,
        "decoding generate: answer with slot decoding when a slot's written text does not name "
        "its expression (that mask would follow the phrase the model wrote); false = the "
        "answer as written.",
        _boolean(),
    ),
    "instance_split": _spec(
        True, "Split each target's mask into connected objects (label k = object k).",
        _boolean(),
    ),
    "min_object_area": _spec(
        32, "Objects smaller than this many pixels are dropped as speckle.",
        _int_range(0, 1 << 30),
    ),
    "max_expressions": _spec(
        5, "Commands with more referring expressions are refused.", _int_range(1, 32),
    ),
    "max_command_chars": _spec(
        500, "Longer commands are refused.", _int_range(1, 10000),
    ),
    "publish_overlay": _spec(
        True, "Publish the rgb8 overlay (computed only while 'overlay' has subscribers).",
        _boolean(),
    ),
    "preencode": _spec(
        False,
        "Encode each new camera frame while the worker is idle, so a command only pays for "
        "its text and the mask decoder (always done in continuous mode; costs compute).",
        _boolean(),
    ),
    "command_queue_size": _spec(
        10,
        "Commands waiting for the worker; a command arriving on a full queue is answered at "
        "once with an error.",
        _int_range(1, 1000),
    ),
}


def validate_parameter(name: str, value: Any) -> str | None:
    """Reason why ``value`` is not valid for parameter ``name`` (None when it is)."""
    spec = PARAMETERS.get(name)
    if spec is None:
        return f"unknown parameter {name!r}"
    return spec.check(value)


def validate_parameters(values: Mapping[str, Any]) -> list[str]:
    """All problems in a parameter mapping (e.g. a YAML file's ``ros__parameters``)."""
    problems = []
    for name, value in values.items():
        reason = validate_parameter(name, value)
        if reason:
            problems.append(f"{name}: {reason}")
    return problems


def image_qos_profile(name: str) -> QoSProfile:
    """Depth 1 in both cases: only the newest frame matters, older ones would be stale."""
    reliability = (
        ReliabilityPolicy.RELIABLE if name == "reliable" else ReliabilityPolicy.BEST_EFFORT
    )
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=1,
        reliability=reliability,
        durability=DurabilityPolicy.VOLATILE,
    )


# ============================================================================ worker state
class _Refused(Exception):
    """A job the node refuses before inference (message is user-facing)."""


@dataclass
class _Frame:
    msg: Image
    key: int  # per-frame counter: the engine's frame-cache key
    received: float  # time.monotonic()


@dataclass
class _Job:
    command: str
    received: float  # time.monotonic() at command receipt (frame receipt for continuous)
    image: Image | None = None  # explicit service image; None = latest camera frame
    reply: Future | None = None  # set for service calls
    from_topic: bool = False  # topic commands become the standing command in continuous mode
    frame: _Frame | None = None  # pinned frame (continuous jobs)
    encode_only: bool = False  # pre-encode ``frame`` for later commands; nothing to answer


@dataclass
class _Stats:
    frames_received: int = 0
    dropped_frames: int = 0
    preencoded: int = 0
    answered: int = 0
    errored: int = 0
    last_error: str = ""
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=500))
    processed_at: deque = field(default_factory=lambda: deque(maxlen=2000))


# ============================================================================ the node
class GSVANode(LifecycleNode):
    """GSVA referring segmentation as a lifecycle node (see the module docstring)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        # Separate groups: a slow service wait never delays images, commands or diagnostics.
        self._image_group = MutuallyExclusiveCallbackGroup()
        self._command_group = MutuallyExclusiveCallbackGroup()
        self._service_group = MutuallyExclusiveCallbackGroup()
        self._timer_group = MutuallyExclusiveCallbackGroup()

        self._engine: Any = None
        self._input_errors: tuple[type[Exception], ...] = (CommandError, ImageError, _Refused)
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._latest: _Frame | None = None
        self._frame_counter = 0
        self._last_used_key = 0
        self._last_encoded_key = 0
        self._standing: str | None = None  # continuous mode: command applied to new frames
        self._next_continuous_at = 0.0
        self._active = False
        self._activated_at = 0.0
        self._image_since_activation = False
        self._last_no_image_warning = 0.0
        self._stats = _Stats()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._image_sub = self._command_sub = None
        self._seg_pub = self._overlay_pub = self._diag_pub = None
        self._service = self._diag_timer = None

        # Start values (overrides, params file) are checked here for an early log line, and
        # again on configure, which refuses to proceed while any of them is invalid.
        self._declare_parameters()
        for problem in validate_parameters(self.parameter_values()):
            self.get_logger().error(f"invalid parameter {problem} (configure will fail)")
        self._refresh_preencode()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.add_post_set_parameters_callback(self._after_set_parameters)

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        for name, spec in PARAMETERS.items():
            descriptor = ParameterDescriptor(
                description=spec.description,
                additional_constraints=spec.constraints,
                dynamic_typing=spec.number,
            )
            self.declare_parameter(name, spec.default, descriptor)

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def parameter_values(self) -> dict[str, Any]:
        return {name: self._param(name) for name in PARAMETERS}

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Runtime validation: a bad value is rejected with the reason (nothing changes)."""
        for p in params:
            if p.name not in PARAMETERS:
                continue  # use_sim_time and other rclpy parameters
            reason = validate_parameter(p.name, p.value)
            if reason:
                return SetParametersResult(successful=False, reason=f"{p.name}: {reason}")
            spec = PARAMETERS[p.name]
            if spec.applied_on_configure and self._engine is not None:
                if p.value != self._param(p.name):
                    return SetParametersResult(
                        successful=False,
                        reason=f"{p.name} is applied on configure; run the lifecycle cleanup "
                        f"transition, set it, then configure and activate again",
                    )
        return SetParametersResult(successful=True)

    def _refresh_preencode(self) -> None:
        # Cached: the worker checks it on every wake-up (up to the camera rate), and
        # get_parameter there would cost more than the check itself.
        self._preencode_on = self._param("mode") == "continuous" or bool(self._param("preencode"))

    def _after_set_parameters(self, params: list[Parameter]) -> None:
        names = {p.name for p in params}
        self._refresh_preencode()
        with self._cond:
            if "mode" in names and self._param("mode") != "continuous":
                self._standing = None  # leaving continuous mode ends the standing command
            self._cond.notify_all()  # mode / rate changes affect the worker's wait

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        problems = validate_parameters(self.parameter_values())
        for problem in problems:
            self.get_logger().error(f"invalid parameter {problem}")
        if problems:
            return TransitionCallbackReturn.FAILURE
        try:
            self._engine = self._load_engine()
        except Exception as exc:  # noqa: BLE001 - any load failure is a configure failure
            self.get_logger().error(
                f"cannot load model {self._param('model')!r} "
                f"(device={self._param('device')}, dtype={self._param('dtype')}): {exc}"
            )
            return TransitionCallbackReturn.FAILURE
        try:
            # Lazy CUDA init, graph capture or compilation happen now, not on the first command.
            warm = self._engine.warmup()
            self.get_logger().info(f"warm-up done in {warm.get('warmup_s', 0.0):.2f} s")
        except Exception as exc:  # noqa: BLE001 - a model that cannot run one command is broken
            self.get_logger().error(f"model {self._param('model')!r} failed its warm-up: {exc}")
            self._engine.close()
            self._engine = None
            return TransitionCallbackReturn.FAILURE
        self._create_interfaces()
        self._start_worker()
        engine = self._engine
        self.get_logger().info(
            f"configured: model {engine.model_name} on {engine.device} ({_dtype_name(engine)}); "
            f"image={self._image_sub.topic_name} ({self._param('image_qos')}), "
            f"command={self._command_sub.topic_name}, mode={self._param('mode')}"
        )
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._cond:
            self._active = True
            self._image_since_activation = False
            self._activated_at = self._last_no_image_warning = time.monotonic()
            self._cond.notify_all()
        self.get_logger().info("active: waiting for images and commands")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate("the node was deactivated before the command was answered")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def destroy_node(self) -> None:
        self._teardown()
        super().destroy_node()

    def _load_engine(self) -> Any:
        model = self._param("model")
        # A missing directory fails fast here, before seconds of torch/transformers imports.
        if ("/" in model or model.startswith(".")) and not Path(model).expanduser().is_dir():
            raise FileNotFoundError(f"model directory {model} does not exist")
        # torch import only when a model is needed (keeps `--help` and YAML checks fast).
        from gsva_ros.engine import GSVAEngine, InputError

        self._input_errors = (CommandError, ImageError, _Refused, InputError)
        return GSVAEngine(
            str(Path(model).expanduser()) if "/" in model else model,
            device=self._param("device"),
            dtype=self._param("dtype"),
            decoding=self._param("decoding"),
            instance_split=self._param("instance_split"),
            min_object_area=self._param("min_object_area"),
            max_expressions=self._param("max_expressions"),
            max_command_chars=self._param("max_command_chars"),
        )

    def _create_interfaces(self) -> None:
        # KEEP_ALL: a command burst while the executor is busy must never overwrite older
        # commands in the reader history (each command is owed exactly one answer).
        commands_qos = QoSProfile(
            history=HistoryPolicy.KEEP_ALL, depth=COMMAND_QOS_DEPTH,
            reliability=ReliabilityPolicy.RELIABLE,
        )
        self._seg_pub = self.create_publisher(
            Segmentation, "segmentation",
            QoSProfile(depth=SEGMENTATION_QOS_DEPTH, reliability=ReliabilityPolicy.RELIABLE),
        )
        # Reliable depth 1 matches both reliable (RViz) and best-effort viewers.
        self._overlay_pub = self.create_publisher(Image, "overlay", 1)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._image_sub = self.create_subscription(
            Image, "image", self._on_image, image_qos_profile(self._param("image_qos")),
            callback_group=self._image_group,
        )
        self._command_sub = self.create_subscription(
            String, "command", self._on_command, commands_qos, callback_group=self._command_group
        )
        self._service = self.create_service(
            Segment, "~/segment", self._on_segment, callback_group=self._service_group
        )
        self._diag_timer = self.create_timer(
            DIAGNOSTICS_PERIOD_S, self._on_diagnostics, callback_group=self._timer_group
        )

    def _destroy_interfaces(self) -> None:
        for timer in (self._diag_timer,):
            if timer is not None:
                self.destroy_timer(timer)
        if self._service is not None:
            self.destroy_service(self._service)
        for sub in (self._image_sub, self._command_sub):
            if sub is not None:
                self.destroy_subscription(sub)
        for pub in (self._seg_pub, self._overlay_pub, self._diag_pub):
            if pub is not None:
                self.destroy_publisher(pub)
        self._image_sub = self._command_sub = None
        self._seg_pub = self._overlay_pub = self._diag_pub = None
        self._service = self._diag_timer = None

    def _deactivate(self, reason: str) -> None:
        """Stop accepting work and answer every queued job with ``reason`` (none is lost)."""
        with self._cond:
            self._active = False
            pending = list(self._jobs)
            self._jobs.clear()
            self._standing = None
            self._latest = None  # a frame from before deactivation is stale on reactivation
            self._cond.notify_all()
        for job in pending:
            self._answer(job, self._error_msg(job, reason, None))

    def _teardown(self) -> None:
        """Back to unconfigured: stop the worker, drop interfaces and free the model."""
        self._deactivate("the node was cleaned up before the command was answered")
        self._stop_worker()
        self._destroy_interfaces()
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
            _free_gpu_memory()

    # ------------------------------------------------------------------ callbacks (cheap)
    def _on_image(self, msg: Image) -> None:
        """Keep only the newest frame; conversion happens in the worker, not here."""
        now = time.monotonic()
        with self._cond:
            if not self._active:
                return
            stats = self._stats
            stats.frames_received += 1
            self._image_since_activation = True
            # A frame replaced before the worker used it, while a standing command wanted it.
            if self._standing is not None and self._latest is not None:
                if self._latest.key > self._last_used_key:
                    stats.dropped_frames += 1
            self._frame_counter += 1
            self._latest = _Frame(msg, self._frame_counter, now)
            self._cond.notify_all()

    def _on_command(self, msg: String) -> None:
        self._submit(_Job(command=msg.data, received=time.monotonic(), from_topic=True))

    def _on_segment(self, request: Segment.Request, response: Segment.Response) -> Any:
        """Service: queue the request for the worker and wait for its answer (own group)."""
        image = None if is_empty_image(request.image) else request.image
        job = _Job(command=request.command, received=time.monotonic(), image=image,
                   reply=Future())
        self._submit(job)
        try:
            response.result = job.reply.result(timeout=SERVICE_TIMEOUT_S)
        except FutureTimeout:
            response.result = self._error_msg(
                job, f"no answer within {SERVICE_TIMEOUT_S:.0f} s", None
            )
        return response

    def _submit(self, job: _Job) -> None:
        """Enqueue a job, or answer it at once when the node is inactive or the queue is full."""
        with self._cond:
            limit = int(self._param("command_queue_size"))
            if not self._active:
                refusal = "the gsva node is not active"
            elif len(self._jobs) >= limit:
                refusal = f"command queue full ({limit})"
            else:
                self._jobs.append(job)
                self._cond.notify_all()
                return
        self._answer(job, self._error_msg(job, refusal, None))

    # ------------------------------------------------------------------ worker
    def _start_worker(self) -> None:
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="gsva-worker", daemon=True)
        self._worker.start()

    def _stop_worker(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        worker, self._worker = self._worker, None
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=60.0)  # an inference in flight finishes first

    def _work(self) -> None:
        while not self._stop.is_set():
            job = self._next_job()
            if job is None:
                continue
            if job.encode_only:
                self._preencode(job.frame)
                continue
            try:
                msg = self._process(job)
            except BaseException as exc:  # noqa: BLE001 - the worker must never die silently
                msg = self._error_msg(job, f"internal error: {type(exc).__name__}: {exc}", None)
            self._answer(job, msg)

    def _next_job(self) -> _Job | None:
        """Queued commands first; else, in continuous mode, the newest unprocessed frame."""
        with self._cond:
            while not self._stop.is_set():
                if self._jobs:
                    return self._jobs.popleft()
                wait = 1.0
                frame = self._latest
                if (
                    self._active
                    and self._standing is not None
                    and self._param("mode") == "continuous"
                    and frame is not None
                    and frame.key > self._last_used_key
                ):
                    wait = self._next_continuous_at - time.monotonic()
                    if wait <= 0:
                        self._last_used_key = frame.key
                        self._schedule_continuous()
                        return _Job(command=self._standing, received=frame.received, frame=frame)
                if self._wants_preencode(frame):
                    self._last_encoded_key = frame.key
                    return _Job(command="", received=frame.received, frame=frame,
                                encode_only=True)
                self._cond.wait(timeout=min(wait, 1.0))
        return None

    def _wants_preencode(self, frame: _Frame | None) -> bool:
        """Idle and a frame not encoded yet (continuous mode, or ``preencode`` on)."""
        return (
            self._preencode_on
            and self._active
            and frame is not None
            and frame.key > max(self._last_encoded_key, self._last_used_key)
        )

    def _preencode(self, frame: _Frame) -> None:
        """Encode a frame ahead of commands; problems surface when a command uses the frame."""
        engine = self._engine
        if engine is None:
            return
        try:
            engine.encode_frame(image_to_rgb(frame.msg), frame.key)
            self._stats.preencoded += 1
        except Exception as exc:  # noqa: BLE001 - reported by the command that uses the frame
            self.get_logger().debug(f"pre-encoding frame {frame.key} failed: {exc}")

    def _schedule_continuous(self) -> None:
        rate = float(self._param("max_rate_hz"))
        self._next_continuous_at = time.monotonic() + (1.0 / rate if rate > 0 else 0.0)

    def _process(self, job: _Job) -> Segmentation:
        """Answer one job; every failure becomes an error Segmentation (never an exception)."""
        header: Header | None = None
        frame_msg: Image | None = None
        try:
            self._check_command(job)
            frame_msg, key = self._pick_image(job)
            header = frame_msg.header
            if job.image is None:
                self._check_age(header)  # explicit service images are used as given
            rgb = image_to_rgb(frame_msg)
            result = self._segment(rgb, job.command, key)
        except self._input_errors as exc:
            # User-facing input problems: reported, not treated as a model failure.
            image = f" [image {describe_image(frame_msg)}]" if frame_msg is not None else ""
            self.get_logger().warning(
                f"command {_short(job.command)} not answered: {exc}{image}"
            )
            return self._error_msg(job, str(exc), header)
        except Exception as exc:  # noqa: BLE001 - model failure: report, recover, keep going
            self.get_logger().error(
                f"model failure on command {_short(job.command)}: {type(exc).__name__}: {exc}"
            )
            if self._engine is not None:
                self._engine.clear_cache()
            return self._error_msg(job, f"model failure: {type(exc).__name__}: {exc}", header)
        if result.note:  # the answer differs from the model's plain one; the msg says why too
            # throttled: in continuous mode the same note would repeat for every frame
            self.get_logger().info(f"command {_short(job.command)}: {result.note}",
                                   throttle_duration_sec=5.0)
        if self._wants_overlay():
            self._publish_overlay(rgb, result, header)
        return result_to_msg(result, header, job.command, "", _ms_since(job.received))

    def _check_command(self, job: _Job) -> None:
        """Validate the text before touching an image; topic commands may become standing."""
        try:
            split_command(
                job.command, self._param("max_expressions"), self._param("max_command_chars")
            )
        except CommandError:
            if job.from_topic or job.frame is not None:
                # An invalid command ends the standing one (also when a runtime limit change
                # made the standing command invalid: no error on every frame).
                with self._cond:
                    self._standing = None
            raise
        if job.from_topic and self._param("mode") == "continuous":
            with self._cond:
                self._standing = job.command
                self._schedule_continuous()

    def _pick_image(self, job: _Job) -> tuple[Image, int | None]:
        if job.image is not None:
            return job.image, None  # one-off image: no frame-cache entry
        frame = job.frame
        if frame is None:
            with self._cond:
                frame = self._latest
                if frame is not None:
                    self._last_used_key = max(self._last_used_key, frame.key)
        if frame is None:
            topic = self._image_sub.topic_name if self._image_sub is not None else "image"
            raise _Refused(f"no image received on {topic} yet")
        return frame.msg, frame.key

    def _check_age(self, header: Header) -> None:
        limit = float(self._param("max_image_age_s"))
        if limit <= 0:
            return
        stamp_ns = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        if stamp_ns == 0:
            raise _Refused("image has no timestamp (header.stamp is 0) but max_image_age_s is set")
        age = (self.get_clock().now().nanoseconds - stamp_ns) / 1e9
        if age > limit:
            raise _Refused(f"image is too old ({age:.2f} s > max_image_age_s {limit:g} s)")

    def _segment(self, rgb: np.ndarray, command: str, key: int | None) -> Any:
        engine = self._engine
        if engine is None:
            raise _Refused("the model is not loaded")
        # Runtime-tunable settings live on the engine; apply the current values per job.
        engine.instance_split = bool(self._param("instance_split"))
        threshold = float(self._param("presence_threshold"))
        engine.presence_threshold = threshold or engine.config.presence_threshold
        engine.min_object_area = int(self._param("min_object_area"))
        engine.reject_empty_masks = bool(self._param("reject_empty_masks"))
        engine.check_generated_phrases = bool(self._param("check_generated_phrases"))
        engine.max_expressions = int(self._param("max_expressions"))
        engine.max_command_chars = int(self._param("max_command_chars"))
        return engine.segment(rgb, command, frame_key=key, decoding=self._param("decoding"))

    def _wants_overlay(self) -> bool:
        pub = self._overlay_pub
        return bool(self._param("publish_overlay")) and pub is not None and (
            pub.get_subscription_count() > 0
        )

    def _publish_overlay(self, rgb: np.ndarray, result: Any, header: Header) -> None:
        try:
            self._overlay_pub.publish(rgb_to_msg(overlay(rgb, result), header))
        except Exception as exc:  # noqa: BLE001 - visualisation must never cost an answer
            self.get_logger().warning(f"overlay not published: {exc}")

    # ------------------------------------------------------------------ answers
    def _error_msg(self, job: _Job, error: str, header: Header | None) -> Segmentation:
        return result_to_msg(None, header, job.command, error, _ms_since(job.received))

    def _answer(self, job: _Job, msg: Segmentation) -> None:
        """Publish the one Segmentation of a job (and hand it to a waiting service call)."""
        msg.latency_ms = float(_ms_since(job.received))
        with self._cond:
            stats = self._stats
            if msg.error:
                stats.errored += 1
                stats.last_error = msg.error
            else:
                stats.answered += 1
                stats.last_error = ""
                stats.latencies_ms.append(msg.latency_ms)
                stats.processed_at.append(time.monotonic())
        pub = self._seg_pub
        if pub is not None:
            try:
                pub.publish(msg)
            except Exception as exc:  # noqa: BLE001 - e.g. publishing during shutdown
                self.get_logger().warning(f"segmentation not published: {exc}")
        if job.reply is not None and not job.reply.done():
            job.reply.set_result(msg)

    # ------------------------------------------------------------------ diagnostics
    def stats(self) -> dict[str, Any]:
        """Snapshot of the counters published on /diagnostics."""
        now = time.monotonic()
        with self._cond:
            s = self._stats
            lat = np.asarray(s.latencies_ms, dtype=np.float64)
            recent = sum(1 for t in s.processed_at if now - t <= RATE_WINDOW_S)
            window = min(RATE_WINDOW_S, max(now - self._activated_at, 1e-3))
            return {
                "state": "active" if self._active else "inactive",
                "processing_rate_hz": recent / window if self._active else 0.0,
                "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else 0.0,
                "latency_p95_ms": float(np.percentile(lat, 95)) if lat.size else 0.0,
                "frames_received": s.frames_received,
                "dropped_frames": s.dropped_frames,
                "preencoded_frames": s.preencoded,
                "queue_depth": len(self._jobs),
                "commands_answered": s.answered,
                "commands_errored": s.errored,
                "last_error": s.last_error,
                "standing_command": self._standing or "",
            }

    def _on_diagnostics(self) -> None:
        stats = self.stats()
        self._warn_if_no_image(stats)
        status = DiagnosticStatus(name=f"{self.get_name()}: segmentation")
        engine = self._engine
        status.hardware_id = str(engine.device) if engine is not None else ""
        status.level, status.message = self._diagnostic_level(stats)
        values = dict(stats)
        values.update(
            mode=self._param("mode"),
            model=engine.model_name if engine is not None else "",
            device=str(engine.device) if engine is not None else "",
            dtype=_dtype_name(engine),
        )
        status.values = [KeyValue(key=k, value=_fmt(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self.get_clock().now().to_msg()
        if self._diag_pub is not None:
            self._diag_pub.publish(array)

    def _diagnostic_level(self, stats: Mapping[str, Any]) -> tuple[bytes, str]:
        if stats["state"] != "active":
            return DiagnosticStatus.WARN, "inactive"
        if not self._image_since_activation:
            return DiagnosticStatus.WARN, "no image received yet"
        if stats["last_error"]:
            return DiagnosticStatus.WARN, f"last command failed: {stats['last_error']}"
        return (
            DiagnosticStatus.OK,
            f"{stats['processing_rate_hz']:.1f} Hz, p50 {stats['latency_p50_ms']:.0f} ms",
        )

    def _warn_if_no_image(self, stats: Mapping[str, Any]) -> None:
        """The most common support question: the node is silent because the topic is wrong."""
        if stats["state"] != "active" or self._image_since_activation or self._image_sub is None:
            return
        now = time.monotonic()
        waited = now - self._activated_at
        first = waited >= NO_IMAGE_WARN_S and self._last_no_image_warning == self._activated_at
        if first or now - self._last_no_image_warning >= NO_IMAGE_WARN_EVERY_S:
            self._last_no_image_warning = now
            self.get_logger().warning(
                f"no image received on {self._image_sub.topic_name} yet — check remapping and "
                f"image_qos (now {self._param('image_qos')}; {waited:.0f} s since activation)"
            )


# ============================================================================ helpers
def _ms_since(t0: float) -> float:
    return (time.monotonic() - t0) * 1e3


def _short(command: str, n: int = 60) -> str:
    """Command text for a log line: quoted, truncated, never multi-line."""
    text = command if len(command) <= n else command[:n] + "…"
    return repr(text)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _dtype_name(engine: Any) -> str:
    return str(engine.dtype).replace("torch.", "") if engine is not None else ""


def _free_gpu_memory() -> None:
    """Give cached CUDA blocks back after the model is dropped (no-op without CUDA)."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ============================================================================ entry points
def main(args: list[str] | None = None) -> int:
    """Plain node: configure and activate at once; exit 1 when the model cannot be loaded."""
    return _run(args, autostart=True)


def main_lifecycle(args: list[str] | None = None) -> int:
    """Managed node: starts unconfigured and waits for a lifecycle manager."""
    return _run(args, autostart=False)


def _run(args: list[str] | None, autostart: bool) -> int:
    rclpy.init(args=args)
    node: GSVANode | None = None
    executor = MultiThreadedExecutor(num_threads=4)
    try:
        try:
            node = GSVANode()
        except rclpy.exceptions.ParameterException as exc:
            print(f"gsva: invalid parameter: {exc}", file=sys.stderr)
            return 2
        executor.add_node(node)
        if autostart and not _autostart(node):
            return 1
        if not autostart:
            node.get_logger().info(
                f"lifecycle node {node.get_fully_qualified_name()} is unconfigured; configure "
                f"and activate it via {node.get_fully_qualified_name()}/change_state"
            )
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def _autostart(node: GSVANode) -> bool:
    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        node.get_logger().fatal(
            "configure failed (reason above): check the 'model' parameter — a bundled name "
            "such as tiny needs models/<name>, otherwise pass a model directory"
        )
        return False
    if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
        node.get_logger().fatal("activate failed")
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
