"""The shipped tiny GSVA (models/tiny): loads by default and is accurate on a fresh split.

Quick thresholds on a small split from a seed never used in training (train: seed 1, the
README's test split: seed 99); the full evaluation is `gsva-ros eval` (see README).
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


def test_tiny_is_the_shipped_default(engine):
    assert resolve_model_dir("tiny") == MODEL_DIR
    assert engine.config.name == "tiny"
    size = sum(f.stat().st_size for f in MODEL_DIR.iterdir())
    assert size < 30 * 2**20


def test_shipped_model_accuracy_on_a_fresh_split(engine, tmp_path):
    generate_dataset(tmp_path / "fresh", n=24, seed=20261129, split="test", progress=False)
    samples = load_grefcoco(tmp_path / "fresh", split="test")
    summary, stats = evaluate(engine, samples, protocol="strict", progress=False)
    assert summary["count"] == len(samples) > 40
    assert summary["giou"] >= 0.75, summary
    assert summary["n_acc"] >= 0.85 and summary["t_acc"] >= 0.85, summary
