"""GRES evaluation of an engine on gRefCOCO-format data (real gRefCOCO or synthetic scenes).

Each image's sentences are asked together, as GSVA's evaluation does, in conversations of at
most ``engine.max_expressions`` expressions joined with ``;`` (the splitter's explicit
separator, so sentence boundaries are exact). The image is encoded once (``frame_key``) and
reused by every conversation about it. Metrics follow ``gsva_ros.metrics`` (strict = ReLA,
lenient = GSVA's released evaluator, which scores forced masks of rejected targets).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from gsva_ros.data.grefcoco import RefSample, group_by_image
from gsva_ros.metrics import GRESMetrics
from gsva_ros.result import FALLBACK_MISCOPIED


def _conversations(engine, samples: Iterable[RefSample], desc: str, progress: bool):
    """→ (image id, RGB image, refs, command) per conversation, each image decoded once."""
    from tqdm import tqdm

    chunk = max(1, engine.max_expressions)
    groups = group_by_image(samples)
    for image_id, refs in tqdm(groups.items(), desc=desc, unit="img", disable=not progress):
        image = np.asarray(Image.open(refs[0].image_path).convert("RGB"))
        for start in range(0, len(refs), chunk):
            part = refs[start : start + chunk]
            yield image_id, image, part, "; ".join(r.sentence.replace(";", " ") for r in part)


def _add(metrics: GRESMetrics, refs: list[RefSample], gts: list, result) -> None:
    for ref, gt, target in zip(refs, gts, result.targets, strict=True):
        pred = target.binary_mask if target.present else target.forced_mask
        metrics.add(target.present, pred, gt, ref.case, ref.kind)


def evaluate(
    engine,
    samples: Iterable[RefSample],
    protocol: str = "strict",
    decoding: str | None = None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Run ``engine`` over ``samples`` → (metrics summary, run statistics).

    Run statistics: ``images``, ``conversations``, ``fallbacks`` (generate → slots),
    ``miscopied`` (those fallbacks taken because a written phrase was not the one asked for),
    ``latency_ms`` (list of per-conversation totals).
    """
    metrics = GRESMetrics(protocol)
    stats = {"images": 0, "conversations": 0, "fallbacks": 0, "miscopied": 0, "latency_ms": []}
    images = set()
    for image_id, image, refs, command in _conversations(engine, samples, "eval", progress):
        images.add(image_id)
        result = engine.segment(
            image,
            command,
            frame_key=("eval", image_id),
            decoding=decoding,
            masks_for_rejected=protocol == "lenient",
        )
        stats["conversations"] += 1
        stats["fallbacks"] += int(bool(result.fallback))
        stats["miscopied"] += int(result.fallback == FALLBACK_MISCOPIED)
        stats["latency_ms"].append(result.timings_ms.get("total", 0.0))
        _add(metrics, refs, [r.load_mask() for r in refs], result)
    stats["images"] = len(images)
    return metrics.summary(), stats


def presence_sweep(
    engine,
    samples: Iterable[RefSample],
    thresholds: Sequence[float],
    protocol: str = "strict",
    decoding: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """GRES metrics of ``engine`` at each presence threshold → one summary per threshold.

    Exact, not a re-scoring of one run: a rejected slot changes the text the later slots are
    decoded after, so every threshold is decoded for real. Each image is encoded once and its
    cached frame serves every threshold. The engine's own threshold is restored afterwards.
    """
    from gsva_ros.engine import check_presence_threshold

    thresholds = [check_presence_threshold(t) for t in thresholds]
    if not thresholds:
        raise ValueError("presence_sweep needs at least one threshold")
    metrics = [GRESMetrics(protocol) for _ in thresholds]
    saved = engine.presence_threshold
    try:
        for image_id, image, refs, command in _conversations(engine, samples, "calibrate",
                                                             progress):
            gts = [r.load_mask() for r in refs]
            for threshold, m in zip(thresholds, metrics, strict=True):
                engine.presence_threshold = threshold
                result = engine.segment(
                    image, command, frame_key=("calibrate", image_id), decoding=decoding,
                    masks_for_rejected=protocol == "lenient",
                )
                _add(m, refs, gts, result)
    finally:
        engine.presence_threshold = saved
    return [{"threshold": t, **m.summary()} for t, m in zip(thresholds, metrics, strict=True)]


def best_threshold(sweep: list[dict], key: str = "giou") -> dict:
    """The sweep row with the highest ``key``; ties go to the threshold nearest 0.5 (GSVA's)."""
    rows = [r for r in sweep if r.get(key) is not None]
    if not rows:
        raise ValueError(f"no threshold has a {key} value")
    return max(rows, key=lambda r: (round(r[key], 12), -abs(r["threshold"] - 0.5)))
