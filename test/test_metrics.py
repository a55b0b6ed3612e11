"""GRES metrics (gIoU, cIoU, N-acc, T-acc) against hand-computed values, both protocols."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gsva_ros.metrics import GRESMetrics, format_table


def _mask(*cells: tuple[int, int], shape: tuple[int, int] = (4, 4)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for r, c in cells:
        m[r, c] = True
    return m


EMPTY = _mask()
GT = _mask((0, 0), (0, 1), (1, 0), (1, 1))  # 4 px
PRED = _mask((0, 1), (0, 2), (1, 1), (1, 2))  # 4 px, I = 2 with GT, U = 6
STRAY = _mask((3, 0), (3, 1), (3, 2))  # 3 px, no overlap with GT


def _feed(m: GRESMetrics) -> list[float]:
    """TN (single), FP with a forced mask (multi), TP (no-target), FN (no-target)."""
    return [
        m.add(True, PRED, GT, "single"),
        m.add(False, PRED, GT, "multi"),
        m.add(False, None, EMPTY, "no-target"),
        m.add(True, STRAY, EMPTY, "no-target"),
    ]


def test_strict_protocol_hand_computed() -> None:
    m = GRESMetrics("strict")
    ious = _feed(m)
    assert ious == pytest.approx([1 / 3, 0.0, 1.0, 0.0])
    s = m.summary()
    assert s["count"] == 4 and s["protocol"] == "strict"
    assert s["giou"] == pytest.approx((1 / 3 + 0 + 1 + 0) / 4)
    # ΣI = 2 (TN) + 0 (FP: intersection dropped); ΣU = 6 (TN) + 6 (|GT ∪ forced|) + 3 (FN)
    assert s["ciou"] == pytest.approx(2 / 15)
    assert s["n_acc"] == pytest.approx(0.5) and s["t_acc"] == pytest.approx(0.5)
    assert s["confusion"] == {"tp": 1, "fn": 1, "fp": 1, "tn": 1}
    pc = s["per_case"]
    assert pc["single"] == pytest.approx({"giou": 1 / 3, "ciou": 1 / 3, "t_acc": 1.0, "count": 1})
    assert pc["multi"] == pytest.approx({"giou": 0.0, "ciou": 0.0, "t_acc": 0.0, "count": 1})
    assert pc["no-target"] == pytest.approx({"giou": 0.5, "ciou": 0.0, "n_acc": 0.5, "count": 2})


def test_lenient_protocol_scores_forced_mask() -> None:
    m = GRESMetrics("lenient")
    ious = _feed(m)
    assert ious == pytest.approx([1 / 3, 1 / 3, 1.0, 0.0])
    s = m.summary()
    assert s["giou"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 4)
    assert s["ciou"] == pytest.approx(4 / 15)
    # Accuracy does not depend on the protocol.
    assert s["n_acc"] == pytest.approx(0.5) and s["t_acc"] == pytest.approx(0.5)
    assert s["per_case"]["multi"]["giou"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("protocol", ["strict", "lenient"])
def test_rejected_target_without_forced_mask(protocol: str) -> None:
    """No forced mask: both protocols score an empty prediction (I = 0, U = |GT| = 4)."""
    m = GRESMetrics(protocol)
    assert m.add(False, None, GT) == 0.0
    m.add(True, GT, GT)  # perfect TN: I = U = 4
    s = m.summary()
    assert s["ciou"] == pytest.approx((0 + 4) / (4 + 4))
    assert s["giou"] == pytest.approx(0.5)
    assert s["t_acc"] == pytest.approx(0.5) and s["n_acc"] is None


def test_strict_fp_union_uses_forced_mask() -> None:
    m = GRESMetrics("strict")
    m.add(False, STRAY, GT)  # forced mask disjoint from GT: U = 4 + 3
    m.add(True, GT, GT)
    assert m.summary()["ciou"] == pytest.approx(4 / (7 + 4))


def test_fn_adds_prediction_to_union_only() -> None:
    m = GRESMetrics()
    m.add(True, GT, GT)  # I = U = 4
    m.add(True, STRAY, EMPTY)  # FN: U += 3
    m.add(True, None, EMPTY)  # FN without a mask: U += 0
    s = m.summary()
    assert s["ciou"] == pytest.approx(4 / 7)
    assert s["giou"] == pytest.approx(1 / 3)
    assert s["n_acc"] == 0.0 and s["confusion"]["fn"] == 2


def test_empty_and_undefined_values_are_none() -> None:
    s = GRESMetrics().summary()
    assert s["count"] == 0 and s["per_case"] == {}
    assert s["giou"] is None and s["ciou"] is None and s["n_acc"] is None and s["t_acc"] is None
    m = GRESMetrics()
    m.add(False, None, EMPTY)  # only a correct rejection: nothing enters cIoU
    s = m.summary()
    assert s["giou"] == 1.0 and s["ciou"] is None and s["n_acc"] == 1.0 and s["t_acc"] is None
    assert "null" in json.dumps(s, allow_nan=False)


def test_gt_empty_means_fewer_than_one_pixel_and_any_nonzero_is_foreground() -> None:
    m = GRESMetrics()
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[0, 0:2] = 2  # label map: object 2
    assert m.add(True, labels, GT.astype(np.uint8) * 255) == pytest.approx(2 / 4)
    assert m.add(False, None, np.zeros((4, 4), np.uint8)) == 1.0  # empty → TP
    assert m.summary()["confusion"] == {"tp": 1, "fn": 0, "fp": 0, "tn": 1}


def test_case_defaults_and_validation() -> None:
    m = GRESMetrics()
    m.add(False, None, EMPTY)  # inferred no-target
    m.add(True, GT, GT)  # non-empty without a label: totals only
    s = m.summary()
    assert list(s["per_case"]) == ["no-target"] and s["count"] == 2
    with pytest.raises(ValueError, match="case"):
        m.add(True, GT, GT, case="plural")
    with pytest.raises(ValueError, match="shape"):
        m.add(True, np.zeros((3, 3), bool), GT)
    with pytest.raises(ValueError, match="protocol"):
        GRESMetrics("loose")


def test_merge_equals_sequential() -> None:
    whole = GRESMetrics("strict")
    _feed(whole)
    a, b = GRESMetrics("strict"), GRESMetrics("strict")
    a.add(True, PRED, GT, "single")
    a.add(False, PRED, GT, "multi")
    b.add(False, None, EMPTY, "no-target")
    b.add(True, STRAY, EMPTY, "no-target")
    assert GRESMetrics.merge(a, b).summary() == whole.summary()
    assert a.update(b).summary() == whole.summary()
    assert b.count == 2  # merging leaves the source untouched
    with pytest.raises(ValueError, match="cannot merge"):
        a.update(GRESMetrics("lenient"))


def test_format_table() -> None:
    m = GRESMetrics("strict")
    _feed(m)
    table = format_table(m.summary())
    lines = table.splitlines()
    assert lines[0] == "protocol: strict"
    assert lines[1].split() == ["case", "count", "gIoU", "cIoU", "N-acc", "T-acc"]
    assert lines[2].split() == ["overall", "4", "33.33", "13.33", "50.00", "50.00"]
    assert lines[3].split() == ["single", "1", "33.33", "33.33", "-", "100.00"]
    assert lines[5].split() == ["no-target", "2", "50.00", "0.00", "50.00", "-"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned columns


def test_per_kind_breakdown_hand_computed_and_merged() -> None:
    m = GRESMetrics("strict")
    m.add(True, PRED, GT, "single", kind="position")  # IoU 1/3, I 2, U 6
    m.add(True, GT, GT, "single", kind="position")  # IoU 1, I 4, U 4
    m.add(False, None, EMPTY, "no-target", kind="absent-color")  # TP
    m.add(True, STRAY, EMPTY, "no-target", kind="absent-color")  # FN, U 3
    m.add(True, GT, GT, "single")  # no kind: totals and per_case only
    s = m.summary()
    assert list(s["per_kind"]) == ["absent-color", "position"]  # sorted, unlabelled left out
    pos, absent = s["per_kind"]["position"], s["per_kind"]["absent-color"]
    assert pos == pytest.approx(
        {"giou": (1 / 3 + 1) / 2, "ciou": 6 / 10, "n_acc": None, "t_acc": 1.0, "count": 2}
    )
    assert absent == pytest.approx(
        {"giou": 0.5, "ciou": 0.0, "n_acc": 0.5, "t_acc": None, "count": 2}
    )
    assert s["count"] == 5 and s["per_case"]["single"]["count"] == 3
    other = GRESMetrics("strict")
    other.add(False, PRED, GT, "multi", kind="position")  # FP: IoU 0 under strict
    merged = GRESMetrics.merge(m, other).summary()["per_kind"]["position"]
    assert merged["count"] == 3 and merged["t_acc"] == pytest.approx(2 / 3)
    assert merged["giou"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    table = format_table(s, "per_kind").splitlines()
    assert table[1].split()[0] == "kind" and table[2].split()[0] == "overall"
    assert [line.split()[0] for line in table[3:]] == ["absent-color", "position"]
    assert GRESMetrics("strict").summary()["per_kind"] == {}
