"""The shipped tiny GSVA (models/tiny): loads by default, and its accuracy on a fresh split.

A small split from a seed never used in training (train: seed 1; the README's test split:
seed 99). Two levels: a regression floor the shipped model must keep (it catches a broken or
untrained model: a random model rejects nearly everything, T-acc ≈ 0), and the issue's targets,
which the shipped model does not reach yet (strict xfail, so reaching them is noticed). The full
evaluation is `gsva-ros eval` (README).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gsva_ros.data.grefcoco import load_grefcoco
from gsva_ros.data.synth import generate_dataset
from gsva_ros.engine import GSVAEngine, resolve_model_dir
from gsva_ros.evaluation import evaluate

MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tiny"


@pytest.fixture(scope="module")
def engine():
    return GSVAEngine("tiny", device="cpu")


@pytest.fixture(scope="module")
def fresh_summary(engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("fresh") / "data"
    generate_dataset(root, n=30, seed=20261129, split="test", progress=False)
    samples = load_grefcoco(root, split="test")
    summary, _ = evaluate(engine, samples, protocol="strict", progress=False)
    assert summary["count"] == len(samples) > 60
    return summary


def test_tiny_is_the_shipped_default(engine):
    assert resolve_model_dir("tiny") == MODEL_DIR
    assert engine.config.name == "tiny"
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) < 30 * 2**20


def test_shipped_model_regression_floor(fresh_summary):
    s = fresh_summary
    # measured for the shipped model on this split: gIoU 0.75, cIoU 0.78, N-acc 0.71, T-acc
    # 0.95, single 0.74, multi 0.78 (103 expressions, so the floors leave room for noise)
    assert s["giou"] >= 0.60 and s["ciou"] >= 0.60, s
    assert s["t_acc"] >= 0.85 and s["n_acc"] >= 0.50, s
    assert s["per_case"]["single"]["giou"] >= 0.55, s
    assert s["per_case"]["multi"]["giou"] >= 0.60, s


@pytest.mark.xfail(strict=True, reason="the shipped tiny model is below the issue's targets "
                   "(gIoU/cIoU >= 0.90, N-acc/T-acc >= 0.97); see README 'The embedded model'")
def test_shipped_model_meets_the_targets(fresh_summary):
    s = fresh_summary
    assert s["giou"] >= 0.90 and s["ciou"] >= 0.90, s
    assert s["n_acc"] >= 0.97 and s["t_acc"] >= 0.97, s
