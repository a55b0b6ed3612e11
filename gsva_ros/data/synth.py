"""Procedural generalized-referring scenes in gRefCOCO format.

The project trains its own tiny GSVA on these scenes, so every image must be learnable and
every annotation exactly right. The pipeline has three independent, deterministic steps, each
driven only by a ``numpy.random.Generator`` (other tools reuse them, e.g. to film a scene with
a moving camera):

1. :func:`sample_scene` → :class:`SceneSpec` (image size, background, objects),
2. :func:`render` → RGB image and one *visible* instance mask per object,
3. :func:`sample_expressions` → referring expressions with their target object indices.

:func:`generate_dataset` chains them and writes ``images/``, ``instances.json`` and
``grefs(unc).json`` (see :mod:`gsva_ros.data.grefcoco`).

Conventions
-----------
* Coordinates are continuous pixel coordinates of the rendered image: x to the right, y down,
  pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``. ``ObjectSpec.cx``, ``cy`` and ``radius``
  are in pixels; ``radius`` is the circumradius (the shape's vertices lie on that circle);
  ``angle`` is a rotation in degrees (clockwise on screen, because y points down).
* Objects are drawn in list order; later objects occlude earlier ones.
* An object's instance mask is the set of pixels where its *visible* coverage (its anti-aliased
  coverage times the part not covered by later objects) is at least 0.5. Masks are disjoint.

Why every object lies inside the central square
-----------------------------------------------
GSVA's language model sees the image only through CLIP preprocessing: shortest side resized to
224, then a 224x224 *centre crop*. For a non-square image everything outside the central
``min(H, W) x min(H, W)`` square is invisible to it, so an expression about an object there could
not be learned (and "leftmost" could pick an object the model never saw). Objects are therefore
placed entirely inside that square (with a small margin), while aspect ratios still vary so that
SAM's branch, which sees the whole image, trains on varied shapes. Object sizes are given as a
fraction of the square's side ``S = min(H, W)`` so they stay visible at 224 px.

Language
--------
Colours: red, green, blue, yellow, purple, orange (vivid; backgrounds are muted and checked for
contrast). Shapes: circle, square, triangle, star. Sizes: small, big (radius bins whose ratio is
at least 1.6; a size word is only used when the objects it separates differ by that ratio).
Positions: "on the left/right", "at the top/bottom" (between exactly two candidates) and
"leftmost/rightmost" (among two or more), only when the centroid gap is at least 15 % of ``S``
(the width of what the model sees). Expressions never contain "and" or commas: the node splits
commands on those, so one sentence must stay one expression.

* single (~50 %): "the red circle", "the star", "the blue shape", "the big blue square",
  "the green triangle on the right", "the leftmost star";
* multi (~30 %): "the yellow stars", "all circles", "the blue shapes", "the small squares",
  "all shapes";
* no-target (~20 %): a plausible combination absent from the scene, mostly near misses that
  share the colour or the shape of a present object ("the purple star", "all triangles").

Each written sentence also carries ``"kind"``, its template family (:attr:`Expression.kind`:
``color-shape``, ``shape``, ``color``, ``size``, ``position``, ``extreme``, ``plural``,
``size-plural``, ``all``, ``absent-*``), an extension of gRefCOCO's sentence record that
``gsva-ros eval`` breaks results down by; loaders that do not know it ignore it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from gsva_ros.data.grefcoco import (
    INSTANCES_FILE,
    REFS_FILE,
    encode_rle,
    fill_polygon,
    polygon_coverage,
)

# Vivid, well separated colours (pairwise RGB distance >= 100) for objects.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 40),
    "green": (35, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 225, 40),
    "purple": (140, 50, 200),
    "orange": (245, 125, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZE_WORDS: tuple[str, ...] = ("small", "big")
POSITION_WORDS: tuple[str, ...] = (
    "on the left",
    "on the right",
    "at the top",
    "at the bottom",
    "leftmost",
    "rightmost",
)
BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "noise", "texture")
CATEGORY_IDS: dict[str, int] = {shape: i + 1 for i, shape in enumerate(SHAPES)}
CASES: tuple[str, ...] = ("single", "multi", "no-target")

# Circumradius bins as a fraction of S = min(H, W); diameters span 10-15 % and 24-35 % of S, so
# any big/small pair differs by at least 0.12 / 0.075 = 1.6x.
RADIUS_RANGE: dict[str, tuple[float, float]] = {"small": (0.05, 0.075), "big": (0.12, 0.175)}
SIZE_RATIO = 1.6
POSITION_GAP = 0.15  # fraction of S between centroids for a positional word
MIN_VISIBLE = 0.6  # every object keeps at least this fraction of its area visible
_SAMPLE_VISIBLE = 0.7  # checked on a coarse raster, so keep a margin over MIN_VISIBLE
_MARGIN = 0.02  # free border inside the central square, fraction of S
_SAME_COLOR_GAP = 0.03  # same-coloured objects never touch (they would merge visually)
_COLOR_JITTER = 8  # per-channel jitter of object colours
_MIN_CONTRAST = 80.0  # min RGB distance between any palette colour and any background colour
_STAR_INNER = 0.48  # inner/outer radius of the star (fat, so small stars stay recognisable)
_SUPERSAMPLE = 4  # 4x4 samples per pixel for anti-aliasing
_COARSE = 128  # raster size of the central square for the occlusion check while sampling
DEFAULT_CASE_WEIGHTS: dict[str, float] = {"single": 0.5, "multi": 0.3, "no-target": 0.2}
# Relative weights of expression families inside a case (default 1.0); fully unrelated absent
# combinations are less informative than near misses.
_KIND_WEIGHTS: dict[str, float] = {"absent-far": 0.4, "all": 0.5}


# --------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------


@dataclass
class ObjectSpec:
    """One flat object. Pixel units, see the module docstring.

    ``rgb`` is the exact fill colour (the palette colour of ``color`` plus a small jitter);
    ``None`` means the palette colour.
    """

    shape: str
    color: str
    size_word: str
    cx: float
    cy: float
    radius: float
    angle: float = 0.0
    rgb: tuple[int, int, int] | None = None

    def fill(self) -> tuple[int, int, int]:
        return self.rgb if self.rgb is not None else PALETTE[self.color]


@dataclass
class Background:
    """Background ``kind`` (one of :data:`BACKGROUND_KINDS`) and its parameters.

    Parameters are plain JSON-able values; noise and texture carry their own ``seed`` so that
    rendering is a pure function of the spec.
    """

    kind: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SceneSpec:
    """Image size in pixels, background and objects (drawn in order, later on top)."""

    height: int
    width: int
    background: Background
    objects: list[ObjectSpec]

    @property
    def square(self) -> tuple[int, int, int]:
        """The central square CLIP sees: ``(x0, y0, side)`` in pixels."""
        side = min(self.height, self.width)
        return (self.width - side) // 2, (self.height - side) // 2, side

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneSpec:
        objects = []
        for o in data["objects"]:
            rgb = o.get("rgb")
            objects.append(ObjectSpec(**{**o, "rgb": None if rgb is None else tuple(rgb)}))
        return cls(
            height=int(data["height"]),
            width=int(data["width"]),
            background=Background(**data["background"]),
            objects=objects,
        )


@dataclass
class Expression:
    """A referring expression and the indices of the objects it refers to (empty = no target).

    ``kind`` names the template family (e.g. ``"color-shape"``, ``"position"``, ``"plural"``,
    ``"absent-color"``); it is written with the sentence and only used to break results down.
    """

    sentence: str
    target_ids: list[int]
    kind: str = ""

    @property
    def case(self) -> str:
        n = len(self.target_ids)
        return "no-target" if n == 0 else ("single" if n == 1 else "multi")


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def shape_polygon(obj: ObjectSpec) -> np.ndarray:
    """Outline of ``obj`` as a float64 ``(N, 2)`` array of ``(x, y)`` pixel coordinates."""
    rot = math.radians(obj.angle)
    if obj.shape == "circle":
        # Enough vertices that the chord error stays far below a (supersampled) pixel.
        n = int(np.clip(obj.radius * 2, 48, 256))
        theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        radii = np.full(n, obj.radius)
    elif obj.shape == "square":
        theta = rot + np.deg2rad([45.0, 135.0, 225.0, 315.0])
        radii = np.full(4, obj.radius)
    elif obj.shape == "triangle":
        theta = rot + np.deg2rad([-90.0, 30.0, 150.0])  # apex up at angle 0
        radii = np.full(3, obj.radius)
    elif obj.shape == "star":
        theta = rot + np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, obj.radius, obj.radius * _STAR_INNER)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
    return np.stack([obj.cx + radii * np.cos(theta), obj.cy + radii * np.sin(theta)], axis=1)


def polygon_area(poly: np.ndarray) -> float:
    """Area of a simple polygon ``(N, 2)`` (shoelace formula)."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _sample_image_size(rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """Height and width in ``[min_size, max_size]`` with aspect ratio (W/H) in about 0.6-1.7."""
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got {min_size}, {max_size}")
    if rng.random() < 0.2:
        aspect = 1.0
    else:
        aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
    stretch = max(aspect, 1.0 / aspect)
    stretch = min(stretch, max_size / min_size)
    long_lo = math.ceil(min_size * stretch)
    long_side = int(rng.integers(long_lo, max_size + 1))
    short_side = int(np.clip(round(long_side / stretch), min_size, max_size))
    return (short_side, long_side) if aspect >= 1.0 else (long_side, short_side)


def _muted_color(rng: np.random.Generator) -> list[int]:
    """A low-saturation colour: a grey level plus a small tint."""
    gray = rng.uniform(45.0, 205.0)
    tint = rng.normal(size=3)
    tint *= rng.uniform(0.0, 28.0) / (np.linalg.norm(tint) + 1e-9)
    return [int(v) for v in np.clip(np.round(gray + tint), 0, 255)]


def _contrast_ok(colors: list[list[int]], spread: float = 0.0) -> bool:
    """Every palette colour differs from every background colour (± ``spread`` grey)."""
    pal = np.array(list(PALETTE.values()), dtype=np.float64)
    for c in colors:
        for delta in (-spread, 0.0, spread):
            bg = np.clip(np.asarray(c, dtype=np.float64) + delta, 0, 255)
            if np.linalg.norm(pal - bg, axis=1).min() < _MIN_CONTRAST:
                return False
    return True


def _sample_background(rng: np.random.Generator, side: int) -> Background:
    """A muted background; ``side`` (= S) scales texture periods."""
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    for _ in range(100):
        if kind == "solid":
            params: dict[str, Any] = {"color": _muted_color(rng)}
            colors, spread = [params["color"]], 0.0
        elif kind == "gradient":
            c0, c1 = _muted_color(rng), _muted_color(rng)
            params = {"color0": c0, "color1": c1, "angle": round(float(rng.uniform(0, 360)), 3)}
            colors, spread = [c0, c1], 0.0
        elif kind == "noise":
            amp = round(float(rng.uniform(6.0, 22.0)), 3)
            params = {
                "color": _muted_color(rng),
                "amplitude": amp,
                "cells": int(rng.integers(3, 17)),
                "grain": round(float(rng.uniform(0.0, 6.0)), 3),
                "seed": int(rng.integers(2**31)),
            }
            colors, spread = [params["color"]], amp + 2 * params["grain"]
        else:
            c0 = _muted_color(rng)
            delta = float(rng.uniform(12.0, 40.0)) * (1 if rng.random() < 0.5 else -1)
            c1 = [int(v) for v in np.clip(np.asarray(c0) + delta, 0, 255)]
            params = {
                "pattern": ("stripes", "checker", "grid")[int(rng.integers(3))],
                "color0": c0,
                "color1": c1,
                "period": round(float(rng.uniform(0.04, 0.15) * side), 3),
                "angle": round(float(rng.uniform(0, 180)), 3),
            }
            colors, spread = [c0, c1], 0.0
        if _contrast_ok(colors, spread):
            return Background(kind, params)
    return Background("solid", {"color": [128, 128, 128]})  # practically unreachable


def _coarse_mask(obj: ObjectSpec, ox: int, oy: int, scale: float, n: int) -> np.ndarray:
    """Cheap ``(n, n)`` bool raster of ``obj`` over the central square (for sampling checks)."""
    return fill_polygon((shape_polygon(obj) - np.array([ox, oy])) * scale, n, n)


def _visible_fractions(full: list[np.ndarray]) -> list[float]:
    """Visible fraction of each coarse mask when later masks are drawn on top."""
    fractions = []
    cover = np.zeros_like(full[0]) if full else None
    for m in reversed(full):
        area = int(m.sum())
        fractions.append(float((m & ~cover).sum()) / area if area else 0.0)
        cover |= m
    return fractions[::-1]


def _sample_objects(rng: np.random.Generator, ox: int, oy: int, side: int) -> list[ObjectSpec]:
    """1-6 objects inside the central square, sharing attributes so that plural, positional
    and size expressions and near-miss negatives arise; occlusion is limited."""
    n_objects = int(rng.choice(np.arange(1, 7), p=[0.05, 0.13, 0.2, 0.22, 0.21, 0.19]))
    # Small palettes per scene create distractors that share a colour or a shape.
    n_colors = int(rng.integers(1, min(n_objects, 4) + 1))
    n_shapes = int(rng.integers(1, min(n_objects, 4) + 1))
    colors = [COLORS[i] for i in rng.permutation(len(COLORS))[:n_colors]]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n_shapes]]
    n = min(side, _COARSE)
    scale = n / side
    margin = _MARGIN * side + 1.0

    objects: list[ObjectSpec] = []
    coarse: list[np.ndarray] = []
    for _ in range(n_objects):
        for _attempt in range(40):
            size_word = SIZE_WORDS[int(rng.integers(2))]
            radius = float(rng.uniform(*RADIUS_RANGE[size_word])) * side
            lo, hi = radius + margin, side - radius - margin
            color = colors[int(rng.integers(len(colors)))]
            jitter = rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, size=3)
            rgb = np.clip(np.asarray(PALETTE[color]) + jitter, 0, 255)
            obj = ObjectSpec(
                shape=shapes[int(rng.integers(len(shapes)))],
                color=color,
                size_word=size_word,
                cx=round(ox + float(rng.uniform(lo, hi)), 3),
                cy=round(oy + float(rng.uniform(lo, hi)), 3),
                radius=round(radius, 3),
                angle=round(float(rng.uniform(0.0, 360.0)), 3),
                rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
            )
            if _placement_ok(obj, objects, coarse, ox, oy, scale, n, side):
                objects.append(obj)
                coarse.append(_coarse_mask(obj, ox, oy, scale, n))
                break
    return objects


def _placement_ok(
    obj: ObjectSpec,
    objects: list[ObjectSpec],
    coarse: list[np.ndarray],
    ox: int,
    oy: int,
    scale: float,
    n: int,
    side: int,
) -> bool:
    for other in objects:
        if other.color == obj.color:
            gap = math.hypot(obj.cx - other.cx, obj.cy - other.cy) - obj.radius - other.radius
            if gap < _SAME_COLOR_GAP * side:
                return False
    masks = [*coarse, _coarse_mask(obj, ox, oy, scale, n)]
    return min(_visible_fractions(masks)) >= _SAMPLE_VISIBLE


def sample_scene(rng: np.random.Generator, min_size: int = 96, max_size: int = 640) -> SceneSpec:
    """Sample an image size, a muted background and 1-6 objects (see module docstring).

    Every object lies inside the central ``S x S`` square, has a diameter of 10-35 % of ``S``
    and keeps at least :data:`MIN_VISIBLE` of its area visible; same-coloured objects never
    touch.
    """
    height, width = _sample_image_size(rng, min_size, max_size)
    side = min(height, width)
    ox, oy = (width - side) // 2, (height - side) // 2
    background = _sample_background(rng, side)
    objects = _sample_objects(rng, ox, oy, side)
    return SceneSpec(height=height, width=width, background=background, objects=objects)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def render_background(bg: Background, height: int, width: int) -> np.ndarray:
    """The background as float32 ``(H, W, 3)`` RGB in ``[0, 255]``."""
    p = bg.params
    if bg.kind == "solid":
        return np.broadcast_to(np.asarray(p["color"], np.float32), (height, width, 3)).copy()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    if bg.kind == "gradient":
        a = math.radians(p["angle"])
        u = xx * math.cos(a) + yy * math.sin(a)
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        c0, c1 = np.asarray(p["color0"], np.float32), np.asarray(p["color1"], np.float32)
        return c0 * (1.0 - t[..., None]) + c1 * t[..., None]
    if bg.kind == "noise":
        nrng = np.random.default_rng(p["seed"])
        cells = int(p["cells"])
        coarse = nrng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
        smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        field_ = np.clip(smooth, -1.0, 1.0) * p["amplitude"]
        field_ += nrng.normal(0.0, p["grain"], size=(height, width)).astype(np.float32)
        return np.asarray(p["color"], np.float32) + field_[..., None]
    if bg.kind == "texture":
        a = math.radians(p["angle"])
        u = (xx * math.cos(a) + yy * math.sin(a)) / p["period"]
        v = (-xx * math.sin(a) + yy * math.cos(a)) / p["period"]
        if p["pattern"] == "stripes":
            t = 0.5 + 0.5 * np.sin(2 * np.pi * u)
        elif p["pattern"] == "checker":
            t = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
        else:  # grid: thin lines every period
            du, dv = np.abs(u - np.round(u)), np.abs(v - np.round(v))
            t = (np.minimum(du, dv) < 0.08).astype(np.float32)
        c0, c1 = np.asarray(p["color0"], np.float32), np.asarray(p["color1"], np.float32)
        return c0 * (1.0 - t[..., None]) + c1 * t[..., None]
    raise ValueError(f"unknown background kind {bg.kind!r}; expected one of {BACKGROUND_KINDS}")


def render(scene: SceneSpec) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw ``scene``.

    Returns:
        image: uint8 ``(H, W, 3)`` RGB, anti-aliased by 4x4 supersampling.
        masks: one bool ``(H, W)`` array per object (same order): the pixels where the object's
            visible coverage — its own coverage times what later objects leave uncovered — is
            at least 0.5. Masks are disjoint.
    """
    h, w = scene.height, scene.width
    image = render_background(scene.background, h, w)
    layers = []
    for obj in scene.objects:
        y0, x0, cov = polygon_coverage([shape_polygon(obj)], h, w, _SUPERSAMPLE)
        win = (slice(y0, y0 + cov.shape[0]), slice(x0, x0 + cov.shape[1]))
        alpha = cov[..., None]
        image[win] = image[win] * (1.0 - alpha) + np.asarray(obj.fill(), np.float32) * alpha
        layers.append((win, cov))
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)

    # Top-down: what each object leaves uncovered is what earlier objects can still show.
    uncovered = np.ones((h, w), dtype=np.float32)
    claimed = np.zeros((h, w), dtype=bool)
    masks: list[np.ndarray] = [np.zeros((h, w), dtype=bool) for _ in scene.objects]
    for i in reversed(range(len(layers))):
        win, cov = layers[i]
        visible = (cov * uncovered[win] >= 0.5) & ~claimed[win]
        masks[i][win] = visible
        claimed[win] |= visible
        uncovered[win] *= 1.0 - cov
    return image, masks


# --------------------------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------------------------


def _noun_phrase(size: str | None, color: str | None, shape: str | None, plural: bool) -> str:
    noun = (shape or "shape") + ("s" if plural else "")
    return " ".join([w for w in (size, color) if w] + [noun])


@dataclass
class _Obj:
    index: int
    color: str
    shape: str
    size_word: str
    radius: float
    x: float  # visible-mask centroid
    y: float


def _scene_objects(
    scene: SceneSpec, masks: list[np.ndarray]
) -> tuple[list[_Obj], list[ObjectSpec]]:
    """Split objects into clearly visible ones and "uncertain" ones.

    An object is present when at least half of its nominal area is visible, ignored when
    (almost) nothing is visible, and uncertain in between (e.g. cut by the image border in a
    moving-camera view); expressions never mention attributes an uncertain object has.
    """
    present, uncertain = [], []
    for i, (obj, mask) in enumerate(zip(scene.objects, masks, strict=True)):
        area = int(mask.sum())
        frac = area / max(polygon_area(shape_polygon(obj)), 1e-6)
        if frac >= 0.5:
            ys, xs = np.nonzero(mask)
            x, y = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
            present.append(_Obj(i, obj.color, obj.shape, obj.size_word, obj.radius, x, y))
        elif frac > 0.02:
            uncertain.append(obj)
    return present, uncertain


# add(case, kind, sentence, targets): records one candidate expression.
_AddFn = Callable[[str, str, str, list[_Obj]], None]


def _matches(objs: list[Any], size: str | None, color: str | None, shape: str | None) -> list:
    return [
        o
        for o in objs
        if (size is None or o.size_word == size)
        and (color is None or o.color == color)
        and (shape is None or o.shape == shape)
    ]


def _size_separates(group: list[_Obj], rest: list[_Obj]) -> bool:
    """Every object in ``group`` differs in radius from every one in ``rest`` by SIZE_RATIO."""
    for a in group:
        for b in rest:
            big, small = max(a.radius, b.radius), min(a.radius, b.radius)
            if big < SIZE_RATIO * small:
                return False
    return True


def _candidate_pools(
    scene: SceneSpec, masks: list[np.ndarray]
) -> dict[str, dict[str, list[Expression]]]:
    """All truthful expressions for the scene, grouped by case, then by template family."""
    objs, uncertain = _scene_objects(scene, masks)
    side = min(scene.height, scene.width)
    gap = POSITION_GAP * side
    pools: dict[str, dict[str, list[Expression]]] = {c: {} for c in CASES}
    seen: set[str] = set()

    def add(case: str, kind: str, sentence: str, targets: list[_Obj]) -> None:
        if sentence not in seen:
            seen.add(sentence)
            ids = sorted(o.index for o in targets)
            pools[case].setdefault(kind, []).append(Expression(sentence, ids, kind))

    # Noun phrases without size: colour+shape, shape only, colour only.
    bases = [(c, s) for c, s in product(COLORS, SHAPES)]
    bases += [(None, s) for s in SHAPES] + [(c, None) for c in COLORS]
    for color, shape in bases:
        if _matches(uncertain, None, color, shape):
            continue  # partly visible object: neither a safe target nor a safe absence
        found = _matches(objs, None, color, shape)
        kind = "color-shape" if color and shape else ("shape" if shape else "color")
        if not found:
            near = any(o.color == color or o.shape == shape for o in objs)
            absent_kind = "absent-" + kind if near or kind != "color-shape" else "absent-far"
            add("no-target", absent_kind, "the " + _noun_phrase(None, color, shape, False), [])
            plural = _noun_phrase(None, color, shape, True)
            add("no-target", absent_kind, ("all " if color is None else "the ") + plural, [])
            continue
        if len(found) == 1:
            add("single", kind, "the " + _noun_phrase(None, color, shape, False), found)
            continue
        plural = _noun_phrase(None, color, shape, True)
        add("multi", "plural", "the " + plural, found)
        if color is None or shape is None:
            add("multi", "plural", "all " + plural, found)
        _add_positional(add, found, _noun_phrase(None, color, shape, False), gap)
        if shape is not None:
            _add_size(add, found, color, shape)
    if len(objs) >= 2 and not uncertain:
        add("multi", "all", "all shapes", objs)
    return pools


def _add_positional(add: _AddFn, found: list[_Obj], phrase: str, gap: float) -> None:
    """'on the left/right', 'at the top/bottom' for two candidates; 'leftmost/rightmost'."""
    if len(found) == 2:
        a, b = sorted(found, key=lambda o: o.x)
        if b.x - a.x >= gap:
            add("single", "position", f"the {phrase} on the left", [a])
            add("single", "position", f"the {phrase} on the right", [b])
        a, b = sorted(found, key=lambda o: o.y)
        if b.y - a.y >= gap:
            add("single", "position", f"the {phrase} at the top", [a])
            add("single", "position", f"the {phrase} at the bottom", [b])
    by_x = sorted(found, key=lambda o: o.x)
    if by_x[1].x - by_x[0].x >= gap:
        add("single", "extreme", f"the leftmost {phrase}", [by_x[0]])
    if by_x[-1].x - by_x[-2].x >= gap:
        add("single", "extreme", f"the rightmost {phrase}", [by_x[-1]])


def _add_size(add: _AddFn, found: list[_Obj], color: str | None, shape: str) -> None:
    """'the big red circle' / 'the small squares' when the size word truly separates."""
    for size in SIZE_WORDS:
        group = [o for o in found if o.size_word == size]
        rest = [o for o in found if o.size_word != size]
        if not group or not rest or not _size_separates(group, rest):
            continue
        plural = len(group) > 1
        phrase = _noun_phrase(size, color, shape, plural)
        add(
            "multi" if plural else "single",
            "size-plural" if plural else "size",
            "the " + phrase,
            group,
        )


def _weighted_choice(rng: np.random.Generator, names: list[str], weights: list[float]) -> str:
    p = np.asarray(weights, dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def sample_expressions(
    scene: SceneSpec,
    masks: list[np.ndarray],
    rng: np.random.Generator,
    k: int,
    case_weights: dict[str, float] | None = None,
) -> list[Expression]:
    """Up to ``k`` distinct, truthful referring expressions for a rendered scene.

    ``masks`` are the visible instance masks from :func:`render` (positions use their
    centroids). A case is drawn with ``case_weights`` (default 50/30/20 single/multi/no-target,
    renormalised over the cases the scene allows), then a template family uniformly, then a
    sentence. Fewer than ``k`` are returned when the scene allows fewer.
    """
    weights = DEFAULT_CASE_WEIGHTS if case_weights is None else case_weights
    pools = _candidate_pools(scene, masks)
    out: list[Expression] = []
    for _ in range(k):
        cases = [c for c in CASES if pools[c] and weights.get(c, 0.0) > 0]
        if not cases:
            break
        case = _weighted_choice(rng, cases, [weights[c] for c in cases])
        kinds = list(pools[case])
        kind = _weighted_choice(rng, kinds, [_KIND_WEIGHTS.get(kd, 1.0) for kd in kinds])
        bucket = pools[case][kind]
        out.append(bucket.pop(int(rng.integers(len(bucket)))))
        if not bucket:
            del pools[case][kind]
    return out


# --------------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------------


def _bbox(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, w, h]`` of a non-empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir}: exists and is not a folder")
        contents = list(out_dir.iterdir())
        if contents and not overwrite:
            raise FileExistsError(f"{out_dir}: folder is not empty (pass overwrite=True)")
        ours = {"images", INSTANCES_FILE, REFS_FILE}
        if contents and not {p.name for p in contents} <= ours:
            raise FileExistsError(f"{out_dir}: holds files that are not a synthetic dataset")


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"), ensure_ascii=True)
        f.write("\n")


def generate_dataset(
    out_dir: str | Path,
    n: int,
    seed: int,
    min_size: int = 96,
    max_size: int = 640,
    split: str = "train",
    expressions_per_image: tuple[int, int] = (2, 5),
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate ``n`` images with expressions and write them in gRefCOCO format.

    Image ``i`` is drawn from ``np.random.default_rng([seed, i])``, so the output (images and
    byte-identical JSON) depends only on the arguments. Everything is written into a hidden
    sibling folder that is renamed to ``out_dir`` at the end: a crash never leaves a
    half-written dataset that looks complete.

    Returns counts: ``images``, ``annotations``, ``refs``, ``sentences``, ``single``,
    ``multi``, ``no-target`` (sentences per case) and ``seconds``.
    """
    from tqdm import tqdm

    lo, hi = expressions_per_image
    if n < 0 or not 1 <= lo <= hi:
        raise ValueError("need n >= 0 and 1 <= min <= max expressions per image")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    start = time.perf_counter()
    try:
        images, annotations, refs = [], [], []
        counts = {c: 0 for c in CASES}
        n_sentences = 0
        for i in tqdm(range(n), desc=f"synth {split}", unit="img", disable=not progress):
            rng = np.random.default_rng([seed, i])
            scene = sample_scene(rng, min_size, max_size)
            image, masks = render(scene)
            exprs = sample_expressions(scene, masks, rng, int(rng.integers(lo, hi + 1)))
            image_id = i + 1
            file_name = f"{split}_{i:06d}.png"
            cv2.imwrite(str(tmp / "images" / file_name), image[..., ::-1])
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "height": scene.height,
                    "width": scene.width,
                }
            )
            ann_of = {}
            for j, (obj, mask) in enumerate(zip(scene.objects, masks, strict=True)):
                if not mask.any():
                    continue
                ann_of[j] = len(annotations) + 1
                annotations.append(
                    {
                        "id": ann_of[j],
                        "image_id": image_id,
                        "category_id": CATEGORY_IDS[obj.shape],
                        "bbox": _bbox(mask),
                        "area": int(mask.sum()),
                        "segmentation": encode_rle(mask),
                        "iscrowd": 0,
                    }
                )
            # One ref per distinct target set; its sentences share the ground truth.
            by_target: dict[tuple[int, ...], list[Expression]] = {}
            for e in exprs:
                by_target.setdefault(tuple(e.target_ids), []).append(e)
            for targets, group in by_target.items():
                sentences = []
                for e in group:
                    sentences.append(
                        {
                            "sent_id": n_sentences,
                            "sent": e.sentence,
                            "raw": e.sentence,
                            "tokens": e.sentence.split(),
                            "kind": e.kind,
                        }
                    )
                    n_sentences += 1
                    counts[e.case] += 1
                refs.append(
                    {
                        "ref_id": len(refs),
                        "image_id": image_id,
                        "file_name": file_name,
                        "split": split,
                        "ann_id": [ann_of[t] for t in targets] or [-1],
                        "category_id": [CATEGORY_IDS[scene.objects[t].shape] for t in targets],
                        "sent_ids": [s["sent_id"] for s in sentences],
                        "sentences": sentences,
                        "no_target": not targets,
                    }
                )
        categories = [
            {"id": cid, "name": s, "supercategory": "shape"} for s, cid in CATEGORY_IDS.items()
        ]
        _write_json(tmp / REFS_FILE, refs)
        # instances.json last: its presence marks a complete dataset.
        _write_json(
            tmp / INSTANCES_FILE,
            {
                "info": {
                    "description": "gsva_ros synthetic generalized referring scenes",
                    "seed": seed,
                    "split": split,
                },
                "images": images,
                "annotations": annotations,
                "categories": categories,
            },
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "images": len(images),
        "annotations": len(annotations),
        "refs": len(refs),
        "sentences": n_sentences,
        **counts,
        "seconds": round(time.perf_counter() - start, 3),
    }
