"""Sample bags from synthetic scenes: a moving camera view, commands and ground truth.

``gsva-ros make-bag`` films :mod:`gsva_ros.data.synth` scenes: every few commands a new scene
is sampled (:func:`~gsva_ros.data.synth.sample_scene`, square, placed in the middle of the
camera frame) and its objects then drift smoothly — a shared sway like a hand-held camera plus
a little motion of their own and a slow spin — while staying inside the central square that
CLIP sees (synth's rule) and keeping at least ``MIN_VISIBLE`` of their area visible on every
frame (the motion is damped until that holds).

About once per second a ``std_msgs/String`` command is published half a frame after the frame
it is timed with, so "the latest image at or before the command" is that frame. Its
expressions come from :func:`~gsva_ros.data.synth.sample_expressions` on that frame and are
kept only if they stay true, with the same targets, on every frame until the next command
and on that next frame itself, which a continuous-mode node still answers with this command
before the next command arrives. Several expressions are joined with ``", "`` or ``"; "``
(synthetic expressions never contain commas or "and").

Topics (stamps start at a fixed epoch, so a seed gives the same bag every time):

* ``/camera/image_raw`` — ``sensor_msgs/Image`` rgb8, ``frame_id`` ``camera``;
* ``/gsva/command`` — ``std_msgs/String``;
* ``/gsva/ground_truth`` — ``gsva_ros/Segmentation`` (convention in :mod:`gsva_ros.bag.replay`):
  one per frame a command applies to (its frame up to and including the next command's frame,
  within one scene), header = that image's header, ``command`` = the command, one Target per
  expression with ``present``, a mono8 label map (k = k-th target object) and one box per
  target object; bag timestamp = the later of the image and the command timestamps.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from gsva_ros.data.synth import (
    MIN_VISIBLE,
    Expression,
    SceneSpec,
    polygon_area,
    render,
    sample_expressions,
    sample_scene,
    shape_polygon,
)
from gsva_ros.result import Box, SegmentationResult, Target

IMAGE_TOPIC = "/camera/image_raw"
COMMAND_TOPIC = "/gsva/command"
GROUND_TRUTH_TOPIC = "/gsva/ground_truth"
FRAME_ID = "camera"
BASE_TIME_NS = 1_700_000_000 * 1_000_000_000  # fixed epoch: same stamps for the same seed
COMMAND_PERIOD_S = 1.0
COMMAND_JITTER = 0.2  # fraction of the period: "every second or so"
FIRST_COMMAND_S = 0.5
COMMANDS_PER_SCENE = 5
MAX_EXPRESSIONS_PER_COMMAND = 3
GROUND_TRUTH_RESPONSE = "ground truth"
_AMPLITUDE = 0.12  # peak motion of an object, fraction of the square's side S
_EDGE = 0.03  # free border kept inside the central square, fraction of S
_SPIN_DEG_S = 20.0
_DAMPING = (1.0, 0.5, 0.25, 0.0)  # motion scales tried until every frame is valid
_RESAMPLE_TRIES = 8


@dataclass
class _Motion:
    """Smooth per-object drift: ``x(τ) = x0 + λ·a·(sin(ωτ + φ) − sin φ)`` (same for y)."""

    omega: tuple[float, float]  # shared angular frequencies (rad/s): the camera's sway
    amp: list[tuple[float, float]]  # per-object amplitudes (px), limited by its free space
    phase: list[tuple[float, float]]
    spin: list[float]  # deg/s
    scale: float = 1.0

    def offset(self, i: int, tau: float) -> tuple[float, float, float]:
        (ax, ay), (px, py) = self.amp[i], self.phase[i]
        wx, wy = self.omega
        dx = ax * (math.sin(wx * tau + px) - math.sin(px))
        dy = ay * (math.sin(wy * tau + py) - math.sin(py))
        return self.scale * dx, self.scale * dy, self.scale * self.spin[i] * tau


@dataclass
class Segment:
    """Frames ``[start, stop)`` showing one scene (objects moving per ``motion``)."""

    start: int
    stop: int
    base: SceneSpec
    motion: _Motion


@dataclass
class PlannedCommand:
    """One command: published at ``stamp_ns``, timed with frame ``frame``, true on ``window``."""

    index: int
    frame: int
    stamp_ns: int
    text: str
    expressions: list[Expression]
    window: range

    @property
    def cases(self) -> list[str]:
        return [e.case for e in self.expressions]


@dataclass
class SamplePlan:
    """Everything a sample bag holds, without the pixels (frames are rendered on demand)."""

    seconds: float
    fps: float
    seed: int
    width: int
    height: int
    n_frames: int
    segments: list[Segment]
    commands: list[PlannedCommand] = field(default_factory=list)

    def frame_stamp(self, i: int) -> int:
        """Bag timestamp and header stamp of frame ``i`` (ns)."""
        return BASE_TIME_NS + round(i * 1e9 / self.fps)

    def segment_of(self, i: int) -> Segment:
        for seg in self.segments:
            if seg.start <= i < seg.stop:
                return seg
        raise IndexError(f"frame {i} is outside the bag (0..{self.n_frames - 1})")

    def scene(self, i: int) -> SceneSpec:
        """The scene as frame ``i`` shows it."""
        seg = self.segment_of(i)
        return _scene_at(seg, (i - seg.start) / self.fps)

    def render(self, i: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Frame ``i``: RGB uint8 image and the visible instance mask of each object."""
        return render(self.scene(i))

    def commands_at(self, i: int) -> list[PlannedCommand]:
        """The commands whose windows hold frame ``i`` (two on a command's own frame: the
        previous command still applies to it until the new one arrives)."""
        return [cmd for cmd in self.commands if i in cmd.window]


# ------------------------------------------------------------------------------------ planning
def _square_scene(rng: np.random.Generator, width: int, height: int) -> SceneSpec:
    """A synth scene sampled as an S×S square, centred in a W×H camera frame."""
    side = min(width, height)
    square = sample_scene(rng, side, side)  # min == max size → a square image
    ox, oy = (width - side) // 2, (height - side) // 2
    objects = [replace(o, cx=o.cx + ox, cy=o.cy + oy) for o in square.objects]
    return SceneSpec(height=height, width=width, background=square.background, objects=objects)


def _sample_motion(rng: np.random.Generator, scene: SceneSpec) -> _Motion:
    ox, oy, side = scene.square
    edge = _EDGE * side + 1.0
    omega = (2 * math.pi / rng.uniform(3.0, 6.0), 2 * math.pi / rng.uniform(4.0, 8.0))
    base_phase = rng.uniform(0.0, 2 * math.pi, size=2)
    amp, phase, spin = [], [], []
    for o in scene.objects:
        lo_x, hi_x = ox + edge + o.radius, ox + side - edge - o.radius
        lo_y, hi_y = oy + edge + o.radius, oy + side - edge - o.radius
        px, py = base_phase + rng.normal(0.0, 0.6, size=2)
        # The drift spans [-(1 + sin φ), 1 - sin φ]·a: size a so both ends stay inside.
        ax = _fit(_AMPLITUDE * side, o.cx - lo_x, hi_x - o.cx, math.sin(px))
        ay = _fit(_AMPLITUDE * side, o.cy - lo_y, hi_y - o.cy, math.sin(py))
        amp.append((ax, ay))
        phase.append((float(px), float(py)))
        spin.append(0.0 if o.shape == "circle" else float(rng.uniform(-1, 1) * _SPIN_DEG_S))
    return _Motion(omega=omega, amp=amp, phase=phase, spin=spin)


def _fit(want: float, room_low: float, room_high: float, s: float) -> float:
    """Largest amplitude ≤ ``want`` with ``a(1+s) ≤ room_low`` and ``a(1−s) ≤ room_high``."""
    a = want
    if 1 + s > 1e-9:
        a = min(a, room_low / (1 + s))
    if 1 - s > 1e-9:
        a = min(a, room_high / (1 - s))
    return max(0.0, a)


def _scene_at(seg: Segment, tau: float) -> SceneSpec:
    objects = []
    for i, o in enumerate(seg.base.objects):
        dx, dy, da = seg.motion.offset(i, tau)
        objects.append(
            replace(o, cx=round(o.cx + dx, 3), cy=round(o.cy + dy, 3),
                    angle=round((o.angle + da) % 360.0, 3))
        )
    return replace(seg.base, objects=objects)


def _frame_ok(scene: SceneSpec, masks: list[np.ndarray]) -> bool:
    """Every object inside the central square and at least MIN_VISIBLE of it visible."""
    ox, oy, side = scene.square
    for o, m in zip(scene.objects, masks, strict=True):
        if o.cx - o.radius < ox or o.cx + o.radius > ox + side:
            return False
        if o.cy - o.radius < oy or o.cy + o.radius > oy + side:
            return False
        if m.sum() < MIN_VISIBLE * polygon_area(shape_polygon(o)):
            return False
    return True


def _truth_table(scene: SceneSpec, masks: list[np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Every truthful expression of a frame → its target objects.

    ``sample_expressions`` with a huge ``k`` drains all candidate pools, i.e. lists every
    expression synth considers true (the throwaway generator only orders them).
    """
    every = sample_expressions(scene, masks, np.random.default_rng(0), k=1_000_000)
    return {e.sentence: tuple(e.target_ids) for e in every}


def _command_frames(rng: np.random.Generator, seconds: float, fps: float, n_frames: int) -> list:
    frames: list[int] = []
    j = 0
    while True:
        t = FIRST_COMMAND_S + j * COMMAND_PERIOD_S
        if t >= seconds:
            break
        t += float(rng.uniform(-COMMAND_JITTER, COMMAND_JITTER)) * COMMAND_PERIOD_S
        f = min(max(int(round(t * fps)), 0), n_frames - 1)
        if not frames or f > frames[-1]:
            frames.append(f)
        j += 1
    return frames


def plan_sample(
    seconds: float = 10.0,
    fps: float = 10.0,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    progress: bool = False,
) -> SamplePlan:
    """Plan a sample bag: scenes, motion, command times and truthful expressions.

    Deterministic for the arguments (every random draw comes from ``default_rng([seed, …])``).
    """
    from tqdm import tqdm

    from gsva_ros.model.text import split_command

    if seconds <= 0 or fps <= 0:
        raise ValueError("seconds and fps must be positive")
    if min(width, height) < 64:
        raise ValueError("frames must be at least 64x64 pixels")
    n_frames = max(1, int(round(seconds * fps)))
    cmd_frames = _command_frames(np.random.default_rng([seed, 1]), seconds, fps, n_frames)
    starts = [0] + [cmd_frames[j] for j in range(COMMANDS_PER_SCENE, len(cmd_frames),
                                                 COMMANDS_PER_SCENE)]
    stops = starts[1:] + [n_frames]
    plan = SamplePlan(seconds, fps, seed, width, height, n_frames, [], [])
    bar = tqdm(total=n_frames, desc="plan", unit="frame", disable=not progress)
    for k, (start, stop) in enumerate(zip(starts, stops, strict=True)):
        rng = np.random.default_rng([seed, 2, k])
        base = _square_scene(rng, width, height)
        motion = _sample_motion(rng, base)
        for scale in _DAMPING:
            motion.scale = scale
            seg = Segment(start, stop, base, motion)
            scenes = {i: _scene_at(seg, (i - start) / fps) for i in range(start, stop)}
            frames = {i: render(scene) for i, scene in scenes.items()}
            if all(_frame_ok(scenes[i], frames[i][1]) for i in frames):
                break
        plan.segments.append(seg)
        truth = {i: _truth_table(scenes[i], frames[i][1]) for i in frames}
        seg_cmds = [(j, f) for j, f in enumerate(cmd_frames) if start <= f < stop]
        for n, (j, f) in enumerate(seg_cmds):
            # Up to and including the next command's frame: a continuous node applies this
            # command to that frame before the next command arrives (half a frame later).
            end = seg_cmds[n + 1][1] + 1 if n + 1 < len(seg_cmds) else stop
            window = range(f, end)
            rng_c = np.random.default_rng([seed, 3, j])
            for _ in range(_RESAMPLE_TRIES):
                k_expr = int(rng_c.integers(1, MAX_EXPRESSIONS_PER_COMMAND + 1))
                drawn = sample_expressions(scenes[f], frames[f][1], rng_c, k_expr)
                # Keep what stays true (same targets) on every frame the command applies to.
                kept = [
                    e for e in drawn
                    if all(truth[i].get(e.sentence) == tuple(e.target_ids) for i in window)
                ]
                sep = ", " if rng_c.random() < 0.5 else "; "
                text = sep.join(e.sentence for e in kept)
                if kept and split_command(text) == [e.sentence for e in kept]:
                    stamp = plan.frame_stamp(f) + round(0.5e9 / fps)
                    plan.commands.append(PlannedCommand(j, f, stamp, text, kept, window))
                    break
        bar.update(stop - start)
    bar.close()
    for n, cmd in enumerate(plan.commands):  # renumber: a command may have been skipped
        cmd.index = n
    return plan


# ------------------------------------------------------------------------------- ground truth
def _box(mask: np.ndarray) -> Box:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return Box(int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1))


def ground_truth_targets(expressions: list[Expression], masks: list[np.ndarray]) -> list[Target]:
    """One Target per expression: label map (k = k-th target object) and one box per object."""
    targets = []
    for e in expressions:
        if not e.target_ids:
            targets.append(Target(e.sentence, False, 1.0))
            continue
        labels = np.zeros(masks[0].shape, dtype=np.uint8)
        boxes = []
        for k, tid in enumerate(e.target_ids, start=1):
            labels[masks[tid]] = k
            boxes.append(_box(masks[tid]))
        targets.append(Target(e.sentence, True, 1.0, labels, boxes))
    return targets


def ground_truth_result(cmd: PlannedCommand, masks: list[np.ndarray]) -> SegmentationResult:
    """The ground truth of ``cmd`` on a frame, as an engine-style result."""
    return SegmentationResult(
        command=cmd.text,
        expressions=[e.sentence for e in cmd.expressions],
        response=GROUND_TRUTH_RESPONSE,
        targets=ground_truth_targets(cmd.expressions, masks),
        image_size=masks[0].shape if masks else (0, 0),
        decoding="ground_truth",
    )


def iter_frames(plan: SamplePlan) -> Iterator[tuple[int, int, np.ndarray, list[np.ndarray]]]:
    """``(index, stamp_ns, image, masks)`` for every frame, rendered on the fly."""
    for i in range(plan.n_frames):
        image, masks = plan.render(i)
        yield i, plan.frame_stamp(i), image, masks


# ------------------------------------------------------------------------------------ writing
def write_sample_bag(
    plan: SamplePlan,
    out: str | os.PathLike,
    storage: str = "mcap",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Render ``plan`` into a rosbag2 bag at ``out`` (atomically). Returns counts."""
    from std_msgs.msg import Header, String
    from tqdm import tqdm

    from gsva_ros.bag.io import BagWriter, set_stamp
    from gsva_ros.ros.conversions import result_to_msg, rgb_to_msg

    start = time.perf_counter()
    n_gt = 0
    with BagWriter(out, storage, overwrite) as bag:
        bag.add_topic(IMAGE_TOPIC, "sensor_msgs/msg/Image")
        bag.add_topic(COMMAND_TOPIC, "std_msgs/msg/String")
        bag.add_topic(GROUND_TRUTH_TOPIC, "gsva_ros/msg/Segmentation")
        frames = tqdm(iter_frames(plan), total=plan.n_frames, desc="make-bag", unit="frame",
                      disable=not progress)
        for i, stamp, image, masks in frames:
            header = Header(frame_id=FRAME_ID)
            set_stamp(header, stamp)
            bag.write_msg(IMAGE_TOPIC, stamp, rgb_to_msg(image, header))
            for cmd in plan.commands_at(i):  # the previous command first (earlier stamp)
                if cmd.frame == i:
                    bag.write_msg(COMMAND_TOPIC, cmd.stamp_ns, String(data=cmd.text))
                gt = result_to_msg(ground_truth_result(cmd, masks), header, cmd.text)
                bag.write_msg(GROUND_TRUTH_TOPIC, max(stamp, cmd.stamp_ns), gt)
                n_gt += 1
    cases = [c for cmd in plan.commands for c in cmd.cases]
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    return {
        "frames": plan.n_frames,
        "commands": len(plan.commands),
        "expressions": len(cases),
        "single": cases.count("single"),
        "multi": cases.count("multi"),
        "no-target": cases.count("no-target"),
        "ground_truth": n_gt,
        "scenes": len(plan.segments),
        "bytes": size,
        "seconds": round(time.perf_counter() - start, 3),
    }
