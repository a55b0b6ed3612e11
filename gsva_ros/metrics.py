"""Generalized referring segmentation metrics: gIoU, cIoU, N-acc, T-acc (reference spec §5.1).

The unit is one expression. Its ground truth is *empty* (no target) iff the GT mask has fewer
than one foreground pixel. Each expression falls in one of four cells, named as in GSVA's
evaluator (``eval_gres``), where the "positive" class is *no target*:

=================  ==========================  =========================================
GT \\ prediction    absent (``[REJ]``)          present (``[SEG]``)
=================  ==========================  =========================================
empty              TP: gIoU += 1, no cIoU      FN: gIoU += 0, cIoU U += |pred|
non-empty          FP: see protocols below     TN: IoU = I / (U + 1e-8), cIoU += (I, U)
=================  ==========================  =========================================

Protocols for FP (a target exists but the model answered ``[REJ]``):

* ``strict`` (ReLA's evaluator): the intersection is 0, so the IoU is 0; cIoU adds I = 0 and
  U = |gt ∪ pred|, where pred is the forced mask if the caller passes one (ReLA still computes
  the union with the network's mask) and empty otherwise, i.e. U = |gt|.
* ``lenient`` (GSVA's evaluator): the forced mask (``pred_mask``; ``None`` = empty) is scored
  as if the target had been predicted present. GSVA's numbers are slightly optimistic for it.

gIoU = mean IoU over all expressions, cIoU = ΣI / ΣU, N-acc = TP / (TP + FN) (no-target
recall), T-acc = TN / (TN + FP) (target recall). A ratio whose denominator is zero is reported
as ``None`` (``null`` in JSON), never NaN, so summaries stay valid JSON and "not measured" is
not confused with 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

PROTOCOLS = ("strict", "lenient")
CASES = ("single", "multi", "no-target")
_EPS = 1e-8  # as in GSVA's per-expression IoU


@dataclass
class _Acc:
    """Running sums for one bucket (overall or one case). Python ints: pixel sums never wrap."""

    count: int = 0
    giou_sum: float = 0.0
    inter: int = 0
    union: int = 0
    tp: int = 0
    fn: int = 0
    fp: int = 0
    tn: int = 0

    def update(self, other: _Acc) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self, case: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "giou": _ratio(self.giou_sum, self.count),
            "ciou": _ratio(self.inter, self.union),
        }
        # Per case only the applicable accuracy: no-target GT → N-acc, target GT → T-acc.
        if case in (None, "no-target"):
            out["n_acc"] = _ratio(self.tp, self.tp + self.fn)
        if case in (None, "single", "multi"):
            out["t_acc"] = _ratio(self.tn, self.tn + self.fp)
        out["count"] = self.count
        return out


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _binary(mask: np.ndarray | None, shape: tuple[int, ...] | None, name: str) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {mask.shape}")
    if shape is not None and mask.shape != shape:
        raise ValueError(f"{name} shape {mask.shape} differs from gt_mask shape {shape}")
    return mask if mask.dtype == bool else mask != 0


class GRESMetrics:
    """Accumulates GRES metrics over expressions; see the module docstring for the rules.

    Example::

        m = GRESMetrics("strict")
        m.add(pred_present=True, pred_mask=pred, gt_mask=gt, case="single")
        print(format_table(m.summary()))
    """

    def __init__(self, protocol: str = "strict") -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.protocol = protocol
        self._total = _Acc()
        self._cases: dict[str, _Acc] = {}
        self._kinds: dict[str, _Acc] = {}

    def add(
        self,
        pred_present: bool,
        pred_mask: np.ndarray | None,
        gt_mask: np.ndarray,
        case: str | None = None,
        kind: str | None = None,
    ) -> float:
        """Score one expression and return its IoU (the amount added to the gIoU sum).

        Args:
            pred_present: the model's decision (``[SEG]`` = True, ``[REJ]`` = False).
            pred_mask: ``(H, W)`` prediction, any dtype, non-zero = foreground. For a rejected
                expression this is the forced mask (used by ``lenient``, and by ``strict`` only
                for the cIoU union); ``None`` = empty.
            gt_mask: ``(H, W)`` ground truth, non-zero = foreground; empty means no target.
            case: ``"single"``, ``"multi"`` or ``"no-target"`` for the per-case breakdown. If
                ``None``, an empty GT is filed under ``"no-target"`` and a non-empty one only in
                the totals (a mask alone cannot tell single from multi). The label never changes
                the scoring, which depends on the GT mask only.
            kind: an optional finer label (e.g. the synthetic scenes' template family, such as
                ``"position"``) for a second breakdown, ``per_kind``; it never changes scoring.
        """
        gt = _binary(gt_mask, None, "gt_mask")
        pred = _binary(pred_mask, gt.shape, "pred_mask")
        if case is not None and case not in CASES:
            raise ValueError(f"case must be one of {CASES} or None, got {case!r}")
        gt_area = int(np.count_nonzero(gt))
        pred_area = 0 if pred is None else int(np.count_nonzero(pred))
        step = _Acc(count=1)
        if gt_area < 1:
            if pred_present:
                step.fn, step.union = 1, pred_area
            else:
                step.tp, step.giou_sum = 1, 1.0
            case = case or "no-target"
        else:
            inter = 0 if pred is None else int(np.count_nonzero(gt & pred))
            union = gt_area + pred_area - inter
            if pred_present:
                step.tn = 1
            else:
                step.fp = 1
                if self.protocol == "strict":
                    inter = 0  # ReLA: a rejected target contributes no intersection
            step.inter, step.union = inter, union
            step.giou_sum = inter / (union + _EPS)
        self._total.update(step)
        if case is not None:
            self._cases.setdefault(case, _Acc()).update(step)
        if kind is not None:
            self._kinds.setdefault(kind, _Acc()).update(step)
        return step.giou_sum

    def update(self, other: GRESMetrics) -> GRESMetrics:
        """Add another accumulator's expressions into this one (same protocol); returns self."""
        if other.protocol != self.protocol:
            raise ValueError(f"cannot merge {other.protocol!r} metrics into {self.protocol!r}")
        self._total.update(other._total)
        for case, acc in other._cases.items():
            self._cases.setdefault(case, _Acc()).update(acc)
        for kind, acc in other._kinds.items():
            self._kinds.setdefault(kind, _Acc()).update(acc)
        return self

    @classmethod
    def merge(cls, *metrics: GRESMetrics) -> GRESMetrics:
        """A new accumulator holding all expressions of ``metrics`` (e.g. from several workers)."""
        if not metrics:
            raise ValueError("merge needs at least one GRESMetrics")
        out = cls(metrics[0].protocol)
        for m in metrics:
            out.update(m)
        return out

    @property
    def count(self) -> int:
        return self._total.count

    def summary(self) -> dict[str, Any]:
        """Metrics as fractions in ``[0, 1]`` (``None`` when undefined).

        Keys: ``giou``, ``ciou``, ``n_acc``, ``t_acc``, ``count``, ``protocol``, ``confusion``
        (``tp``, ``fn``, ``fp``, ``tn``) and ``per_case``: for each case seen, ``giou``,
        ``ciou``, ``count`` and ``n_acc`` (no-target) or ``t_acc`` (single, multi);
        ``per_kind``: for each kind seen (sorted; empty without kinds), ``giou``, ``ciou``,
        ``n_acc``, ``t_acc`` (``None`` where the kind has no such expression) and ``count``.
        """
        out = self._total.summary()
        out["protocol"] = self.protocol
        t = self._total
        out["confusion"] = {"tp": t.tp, "fn": t.fn, "fp": t.fp, "tn": t.tn}
        out["per_case"] = {c: self._cases[c].summary(c) for c in CASES if c in self._cases}
        out["per_kind"] = {k: self._kinds[k].summary() for k in sorted(self._kinds)}
        return out


def percent(value: float | None) -> str:
    """A 0..1 metric as a percent string with two decimals; ``-`` when not defined."""
    return "-" if value is None else f"{100.0 * value:.2f}"


def format_table(summary: dict[str, Any], breakdown: str = "per_case") -> str:
    """A small aligned text table of a :meth:`GRESMetrics.summary` (percent; ``-`` = n/a).

    ``breakdown`` picks the rows under "overall": ``"per_case"`` or ``"per_kind"``.
    """
    header = ("case" if breakdown == "per_case" else "kind", "count", "gIoU", "cIoU", "N-acc",
              "T-acc")
    rows = [("overall", summary)]
    rows += [(c, s) for c, s in summary.get(breakdown, {}).items()]
    lines = [header] + [
        (
            name,
            str(s.get("count", 0)),
            percent(s.get("giou")),
            percent(s.get("ciou")),
            percent(s.get("n_acc")),
            percent(s.get("t_acc")),
        )
        for name, s in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    if "protocol" in summary:
        text.insert(0, f"protocol: {summary['protocol']}")
    return "\n".join(text)
