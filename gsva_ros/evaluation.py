"""GRES evaluation of an engine on gRefCOCO-format data (real gRefCOCO or synthetic scenes).

Each image's sentences are asked together, as GSVA's evaluation does, in conversations of at
most ``engine.max_expressions`` expressions joined with ``;`` (the splitter's explicit
separator, so sentence boundaries are exact). The image is encoded once (``frame_key``) and
reused by every conversation about it. Metrics follow ``gsva_ros.metrics`` (strict = ReLA,
lenient = GSVA's released evaluator, which scores forced masks of rejected targets).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

from gsva_ros.data.grefcoco import RefSample, group_by_image
from gsva_ros.metrics import GRESMetrics


def evaluate(
    engine,
    samples: Iterable[RefSample],
    protocol: str = "strict",
    decoding: str | None = None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Run ``engine`` over ``samples`` → (metrics summary, run statistics).

    Run statistics: ``images``, ``conversations``, ``fallbacks`` (generate → slots),
    ``latency_ms`` (list of per-conversation totals).
    """
    from tqdm import tqdm

    metrics = GRESMetrics(protocol)
    groups = group_by_image(samples)
    stats = {"images": 0, "conversations": 0, "fallbacks": 0, "latency_ms": []}
    chunk = max(1, engine.max_expressions)
    for image_id, refs in tqdm(groups.items(), desc="eval", unit="img", disable=not progress):
        image = np.asarray(Image.open(refs[0].image_path).convert("RGB"))
        stats["images"] += 1
        for start in range(0, len(refs), chunk):
            part = refs[start : start + chunk]
            command = "; ".join(r.sentence.replace(";", " ") for r in part)
            result = engine.segment(
                image,
                command,
                frame_key=("eval", image_id),
                decoding=decoding,
                masks_for_rejected=protocol == "lenient",
            )
            stats["conversations"] += 1
            stats["fallbacks"] += int(bool(result.note))
            stats["latency_ms"].append(result.timings_ms.get("total", 0.0))
            for ref, target in zip(part, result.targets, strict=True):
                pred = target.binary_mask if target.present else target.forced_mask
                metrics.add(target.present, pred, ref.load_mask(), ref.case)
    return metrics.summary(), stats
