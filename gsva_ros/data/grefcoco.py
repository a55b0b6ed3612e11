"""gRefCOCO loader (the real dataset or the synthetic one written by :mod:`gsva_ros.data.synth`).

Layout (reference spec §6)::

    root/
      grefs(unc).json   list of refs: ref_id, image_id, file_name, split, ann_id (list; [-1] =
                        no target), category_id (list), sent_ids, sentences [{sent_id, sent, raw,
                        tokens, optional kind}], optional no_target
      instances.json    COCO: images [{id, file_name, height, width}], annotations [{id, image_id,
                        category_id, bbox, area, segmentation, iscrowd}], categories
      images/           default image folder; the real gRefCOCO uses COCO train2014 images that
                        live elsewhere, pass ``image_dir`` for those

The official release also ships ``grefs(unc).p``, a pickle. We never unpickle user files (a
pickle can execute arbitrary code), so such a file is refused with a message explaining how to
convert it to JSON once, on a machine and with a file the user trusts.

Conventions:

* One :class:`RefSample` per *sentence*: each sentence is one evaluation unit and all sentences
  of a ref share its ground truth (the union of the ref's instance masks).
* Masks are ``bool`` arrays of shape ``(H, W)``; ``True`` = object.
* COCO RLE runs over the image in column-major (Fortran) order, alternating background and
  foreground runs and starting with a (possibly empty) background run. ``counts`` is either a
  list of ints ("uncompressed") or COCO's compact ASCII string ("compressed"), both handled by
  :func:`decode_rle`. Polygons are flat ``[x0, y0, x1, y1, ...]`` lists in continuous pixel
  coordinates (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``); a pixel belongs to a polygon
  when its centre is inside. Polygons with fewer than three points are dropped, as gRefCOCO's
  own loaders do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

REFS_FILE = "grefs(unc).json"
PICKLE_REFS_FILE = "grefs(unc).p"
INSTANCES_FILE = "instances.json"

Case = Literal["single", "multi", "no-target"]


class GRefCOCOError(ValueError):
    """A gRefCOCO file that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------
# RLE and polygons
# --------------------------------------------------------------------------------------------


def encode_rle(mask: np.ndarray, compressed: bool = False) -> dict[str, Any]:
    """Encode a binary ``(H, W)`` mask as COCO RLE ``{"size": [H, W], "counts": ...}``.

    ``counts`` is a list of ints, or COCO's compressed string when ``compressed`` is True.
    Any non-zero value counts as foreground.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    h, w = mask.shape
    flat = mask.ravel(order="F") != 0
    if flat.size == 0:
        counts: list[int] = []
    else:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        bounds = np.concatenate(([0], change, [flat.size]))
        counts = np.diff(bounds).tolist()
        if flat[0]:  # RLE always starts with a background run, possibly of length 0
            counts.insert(0, 0)
    return {"size": [int(h), int(w)], "counts": compress_counts(counts) if compressed else counts}


def compress_counts(counts: Sequence[int]) -> str:
    """COCO's compact string form of RLE counts.

    Each count from the third on is stored as the difference to the count two places earlier
    (runs of the same kind tend to have similar lengths). Every value is then written as
    little-endian 5-bit groups, one character per group (value + 48): bit 0x20 marks "more
    groups follow", and in the last group bit 0x10 is the sign bit of the two's-complement value.
    """
    out: list[str] = []
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        while True:
            group = x & 0x1F
            x >>= 5  # arithmetic shift: negative values converge to -1
            done = (x == -1) if group & 0x10 else (x == 0)
            out.append(chr(48 + (group if done else group | 0x20)))
            if done:
                break
    return "".join(out)


def decompress_counts(text: str | bytes) -> list[int]:
    """Inverse of :func:`compress_counts`; raises ``ValueError`` on a malformed string."""
    if isinstance(text, bytes):
        text = text.decode("ascii")
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value = 0
        shift = 0
        while True:
            if pos >= len(text):
                raise ValueError("compressed RLE counts end in the middle of a value")
            group = ord(text[pos]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"invalid character {text[pos]!r} in compressed RLE counts")
            pos += 1
            value |= (group & 0x1F) << shift
            shift += 5
            if not group & 0x20:
                if group & 0x10:  # sign-extend the two's-complement value
                    value -= 1 << shift
                break
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """Decode a COCO RLE dict (list or compressed-string ``counts``) to a bool ``(H, W)`` mask."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"RLE needs 'size' [h, w] and 'counts', got {_short(rle)}") from exc
    if isinstance(counts, str | bytes):
        counts = decompress_counts(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("RLE counts must be a flat list of non-negative integers")
    if int(counts.sum()) != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected h*w = {h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True  # runs alternate background / foreground, background first
    flat = np.repeat(values, counts)
    # Column-major: flat index = col * h + row.
    return np.ascontiguousarray(flat.reshape(w, h).T)


def fill_polygon(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bool ``(height, width)`` mask of the grid cells whose *centre* is inside a polygon.

    ``xy`` is ``(N, 2)`` in continuous grid coordinates (cell ``(r, c)`` covers
    ``[c, c+1) x [r, r+1)``, centre ``(c + 0.5, r + 0.5)``); even-odd rule, half-open edges so
    that polygons sharing an edge never both claim a centre on it.

    cv2.fillPoly is not used on purpose: it fills every pixel an edge touches (a 5x5 box becomes
    6x6), which would bias both decoded masks and rendered coverage.
    """
    out = np.zeros((height, width), dtype=bool)
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 3 or height == 0 or width == 0:
        return out
    x1, y1 = xy[:, 0], xy[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    lo, hi = np.minimum(y1, y2), np.maximum(y1, y2)
    # Row r (centre r + 0.5) crosses an edge iff lo <= r + 0.5 < hi; horizontal edges never.
    r0 = np.clip(np.ceil(lo - 0.5), 0, height).astype(np.int64)
    r1 = np.clip(np.ceil(hi - 0.5), 0, height).astype(np.int64)
    n = np.maximum(r1 - r0, 0)
    if n.sum() == 0:
        return out
    edge = np.repeat(np.arange(len(xy)), n)
    start = np.cumsum(n) - n
    rows = r0[edge] + np.arange(int(n.sum())) - start[edge]
    yc = rows + 0.5
    xc = x1[edge] + (yc - y1[edge]) * (x2[edge] - x1[edge]) / (y2[edge] - y1[edge])
    # A crossing at x toggles every cell whose centre c + 0.5 >= x.
    cols = np.clip(np.ceil(xc - 0.5), 0, width).astype(np.int64)
    toggles = np.zeros((height, width + 1), dtype=np.int32)
    np.add.at(toggles, (rows, cols), 1)
    return (np.cumsum(toggles, axis=1)[:, :width] & 1).astype(bool)


def _as_points(polygons: Iterable[Sequence[float] | np.ndarray]) -> list[np.ndarray]:
    """``(N, 2)`` arrays of the polygons with at least three points (others are dropped)."""
    pts = []
    for poly in polygons:
        xy = np.asarray(poly, dtype=np.float64).reshape(-1)
        if xy.size >= 6 and xy.size % 2 == 0:
            pts.append(xy.reshape(-1, 2))
    return pts


def polygon_coverage(
    polygons: Iterable[Sequence[float] | np.ndarray],
    height: int,
    width: int,
    supersample: int = 4,
) -> tuple[int, int, np.ndarray]:
    """Fraction of each pixel covered by the union of polygons (``supersample``² samples/pixel).

    ``polygons`` are flat ``[x0, y0, x1, y1, ...]`` sequences or ``(N, 2)`` arrays in continuous
    pixel coordinates; polygons with fewer than three points are dropped. Only the bounding box
    of the polygons is rasterized.

    Returns ``(y0, x0, coverage)``: ``coverage`` is float32 ``(h, w)`` in ``[0, 1]`` for the
    image window whose top-left pixel is ``(y0, x0)`` (empty when nothing is inside).
    """
    pts = _as_points(polygons)
    if not pts:
        return 0, 0, np.zeros((0, 0), dtype=np.float32)
    allpts = np.concatenate(pts)
    x0 = max(int(np.floor(allpts[:, 0].min())), 0)
    y0 = max(int(np.floor(allpts[:, 1].min())), 0)
    x1 = min(int(np.ceil(allpts[:, 0].max())), width)
    y1 = min(int(np.ceil(allpts[:, 1].max())), height)
    if x1 <= x0 or y1 <= y0:
        return 0, 0, np.zeros((0, 0), dtype=np.float32)
    ss = supersample
    h, w = y1 - y0, x1 - x0
    inside = np.zeros((h * ss, w * ss), dtype=bool)
    origin = np.array([x0, y0], dtype=np.float64)
    for p in pts:
        inside |= fill_polygon((p - origin) * ss, h * ss, w * ss)
    cover = inside.reshape(h, ss, w, ss).sum(axis=(1, 3), dtype=np.int32)
    return y0, x0, cover.astype(np.float32) / np.float32(ss * ss)


def decode_polygons(polygons: Iterable[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterize COCO polygons (flat ``[x0, y0, x1, y1, ...]``) to a bool ``(H, W)`` mask.

    A pixel is foreground when its centre lies inside a polygon (the union is taken over
    polygons); polygons with fewer than three points are dropped.
    """
    mask = np.zeros((height, width), dtype=bool)
    for p in _as_points(polygons):
        mask |= fill_polygon(p, height, width)
    return mask


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO ``segmentation`` (polygon list, RLE dict, or list of RLE dicts).

    Returns a bool ``(height, width)`` mask; RLE sizes must match the image size.
    """
    if isinstance(segmentation, dict):
        rles = [segmentation]
    elif isinstance(segmentation, list) and all(isinstance(s, dict) for s in segmentation):
        rles = segmentation
        if not rles:
            return np.zeros((height, width), dtype=bool)
    elif isinstance(segmentation, list):
        return decode_polygons(segmentation, height, width)
    else:
        raise ValueError(f"unsupported segmentation type {type(segmentation).__name__}")
    mask = np.zeros((height, width), dtype=bool)
    for rle in rles:
        part = decode_rle(rle)
        if part.shape != (height, width):
            raise ValueError(f"RLE size {list(part.shape)} does not match image {[height, width]}")
        mask |= part
    return mask


def _short(obj: Any, limit: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefSample:
    """One referring sentence with its ground truth.

    ``ann_ids`` are the COCO annotation ids of the targets (empty for a no-target ref, which the
    file marks as ``[-1]``). ``case`` is ``"no-target"`` without targets, ``"multi"`` with two
    or more, else ``"single"``. ``height``/``width`` are the image size from ``instances.json``.
    The mask is decoded on demand by :meth:`load_mask` so a loaded split costs little memory.
    ``kind`` is the sentence's template family where the data names one (the synthetic scenes
    do, real gRefCOCO does not: ``None``); evaluation breaks results down by it.
    """

    ref_id: int
    sent_id: int
    image_id: int
    image_path: Path
    sentence: str
    ann_ids: tuple[int, ...]
    no_target: bool
    case: Case
    height: int
    width: int
    split: str | None = None
    kind: str | None = None
    # COCO category id of each target annotation (ann_ids order); () when not given
    category_ids: tuple[int, ...] = ()
    segmentations: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def load_mask(self) -> np.ndarray:
        """Ground truth as a bool ``(height, width)`` array: union of the targets, or all False."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        for seg in self.segmentations:
            mask |= decode_segmentation(seg, self.height, self.width)
        return mask


def group_by_image(samples: Iterable[RefSample]) -> dict[int, list[RefSample]]:
    """Group samples by ``image_id`` (order of first appearance is kept, within and across groups).

    Training and evaluation put several expressions of one image into one conversation.
    """
    groups: dict[int, list[RefSample]] = {}
    for sample in samples:
        groups.setdefault(sample.image_id, []).append(sample)
    return groups


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (expected a gRefCOCO folder, see docs)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise GRefCOCOError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise GRefCOCOError(f"{path}: not UTF-8 text ({exc.reason})") from exc


def _refuse_pickle(path: Path) -> None:
    raise GRefCOCOError(
        f"{path}: pickle files are not loaded (unpickling can run arbitrary code). Convert it "
        'to JSON once, with a file you trust, e.g. `python -c "import pickle, json; '
        "json.dump(pickle.load(open('grefs(unc).p', 'rb')), open('grefs(unc).json', 'w'))\"`, "
        f"and place {REFS_FILE} next to {INSTANCES_FILE}."
    )


def _find_refs_file(root: Path) -> Path:
    if root.suffix == ".p":
        _refuse_pickle(root)
    if root.is_file():
        raise GRefCOCOError(f"{root}: expected the gRefCOCO folder, not a file")
    path = root / REFS_FILE
    if not path.is_file() and (root / PICKLE_REFS_FILE).is_file():
        _refuse_pickle(root / PICKLE_REFS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (gRefCOCO refs, {REFS_FILE})")
    return path


def _require(cond: bool, path: Path, where: str, problem: str) -> None:
    if not cond:
        raise GRefCOCOError(f"{path}: {where}: {problem}")


def _index_instances(path: Path, data: Any) -> tuple[dict[int, dict], dict[int, dict]]:
    """Validate ``instances.json`` and index images and annotations by id."""
    _require(isinstance(data, dict), path, "top level", "expected a JSON object")
    for key in ("images", "annotations"):
        _require(isinstance(data.get(key), list), path, "top level", f"missing list '{key}'")
    images: dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        ok = isinstance(img, dict) and all(k in img for k in ("id", "file_name", "height", "width"))
        _require(ok, path, f"images[{i}]", "needs id, file_name, height, width")
        images[int(img["id"])] = img
    anns: dict[int, dict] = {}
    for i, ann in enumerate(data["annotations"]):
        ok = isinstance(ann, dict) and all(k in ann for k in ("id", "image_id", "segmentation"))
        _require(ok, path, f"annotations[{i}]", "needs id, image_id, segmentation")
        anns[int(ann["id"])] = ann
    return images, anns


def _ann_ids(ref: dict, refs_path: Path, where: str) -> tuple[int, ...]:
    raw = ref["ann_id"]
    ids = [raw] if isinstance(raw, int) else raw
    ok = isinstance(ids, list) and all(isinstance(a, int) for a in ids)
    _require(ok, refs_path, where, f"ann_id must be a list of ints, got {_short(raw)}")
    if -1 in ids:
        _require(ids == [-1], refs_path, where, f"ann_id mixes -1 with real ids: {ids}")
        return ()
    return tuple(ids)


def _sentence_text(sent: Any) -> str | None:
    if not isinstance(sent, dict):
        return None
    text = sent.get("sent", sent.get("raw"))
    return text.strip() if isinstance(text, str) else None


def _sentence_kind(sent: dict, path: Path, where: str) -> str | None:
    kind = sent.get("kind")
    _require(kind is None or (isinstance(kind, str) and kind.strip() != ""), path, where,
             "'kind' must be a non-empty string when given")
    return kind.strip() if kind is not None else None


def load_grefcoco(
    root: str | Path,
    split: str | None = None,
    image_dir: str | Path | None = None,
) -> list[RefSample]:
    """Load gRefCOCO (or the synthetic set) as one :class:`RefSample` per sentence.

    Args:
        root: folder holding ``grefs(unc).json`` and ``instances.json``.
        split: keep only refs of this split (``train``, ``val``, ``testA``, ``testB``);
            ``None`` keeps all.
        image_dir: folder of the image files; default ``root/images``. Image file names come
            from ``instances.json`` (real gRefCOCO refs carry a per-ref suffixed ``file_name``
            that is not the image file), falling back to the ref's ``file_name``.

    Raises:
        FileNotFoundError: a required file is missing.
        GRefCOCOError: malformed JSON or schema, a pickle file, or a dangling id.
    """
    root = Path(root)
    refs_path = _find_refs_file(root)
    inst_path = root / INSTANCES_FILE
    refs = _read_json(refs_path)
    images, anns = _index_instances(inst_path, _read_json(inst_path))
    _require(isinstance(refs, list), refs_path, "top level", "expected a list of refs")
    img_root = Path(image_dir) if image_dir is not None else root / "images"

    samples: list[RefSample] = []
    for i, ref in enumerate(refs):
        where = f"refs[{i}]"
        needed = ("ref_id", "image_id", "ann_id", "sentences")
        ok = isinstance(ref, dict) and all(k in ref for k in needed)
        _require(ok, refs_path, where, "needs ref_id, image_id, ann_id, sentences")
        if split is not None and ref.get("split") != split:
            continue
        image_id = int(ref["image_id"])
        img = images.get(image_id)
        _require(img is not None, refs_path, where, f"image_id {image_id} not in {inst_path.name}")
        ann_ids = _ann_ids(ref, refs_path, where)
        segs, cats = [], []
        for a in ann_ids:
            _require(a in anns, refs_path, where, f"ann_id {a} not in {inst_path.name}")
            segs.append(anns[a]["segmentation"])
            cats.append(anns[a].get("category_id"))
        case: Case = "no-target" if not ann_ids else ("multi" if len(ann_ids) > 1 else "single")
        file_name = img.get("file_name") or ref.get("file_name")
        sentences = ref["sentences"]
        _require(isinstance(sentences, list), refs_path, where, "sentences must be a list")
        for j, sent in enumerate(sentences):
            text = _sentence_text(sent)
            _require(text is not None, refs_path, f"{where}.sentences[{j}]", "needs 'sent' text")
            samples.append(
                RefSample(
                    ref_id=int(ref["ref_id"]),
                    sent_id=int(sent.get("sent_id", -1)),
                    image_id=image_id,
                    image_path=img_root / file_name,
                    sentence=text,
                    ann_ids=ann_ids,
                    no_target=not ann_ids,
                    case=case,
                    height=int(img["height"]),
                    width=int(img["width"]),
                    split=ref.get("split"),
                    kind=_sentence_kind(sent, refs_path, f"{where}.sentences[{j}]"),
                    category_ids=tuple(cats) if all(isinstance(c, int) for c in cats) else (),
                    segmentations=tuple(segs),
                )
            )
    return samples
