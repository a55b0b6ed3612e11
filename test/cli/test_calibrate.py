"""gsva-ros calibrate: an exact presence-threshold sweep, the choice, and writing it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from gsva_ros.cli.main import main
from gsva_ros.data.grefcoco import load_grefcoco
from gsva_ros.data.synth import generate_dataset
from gsva_ros.engine import GSVAEngine
from gsva_ros.evaluation import best_threshold, evaluate, presence_sweep
from gsva_ros.model.config import GSVAConfig
from gsva_ros.result import FALLBACK_MISCOPIED, FALLBACK_SLOT_COUNT


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("val") / "d"
    generate_dataset(root, n=4, seed=3, max_size=128, split="val", progress=False)
    return root


def test_sweep_equals_a_full_evaluation_at_each_threshold(tiny_model_dir, val_dir):
    samples = load_grefcoco(val_dir, split="val")
    engine = GSVAEngine(tiny_model_dir, device="cpu")
    thresholds = [0.3, 0.5, 0.7]
    sweep = presence_sweep(engine, samples, thresholds, progress=False)
    assert engine.presence_threshold == 0.5  # restored
    assert [r["threshold"] for r in sweep] == thresholds
    for row in sweep:
        engine.presence_threshold = row["threshold"]
        plain, _ = evaluate(engine, samples, progress=False)
        assert row["confusion"] == plain["confusion"]
        assert row["giou"] == pytest.approx(plain["giou"])
    # the thresholds really change the answers (the random model's shares lie between them)
    present = [r["confusion"]["tn"] + r["confusion"]["fn"] for r in sweep]
    assert present[0] > present[-1]


def test_evaluate_counts_fallbacks_by_the_reason_the_engine_gives(tiny_model_dir, val_dir):
    samples = load_grefcoco(val_dir, split="val")
    engine = GSVAEngine(tiny_model_dir, device="cpu")
    given = [FALLBACK_MISCOPIED, "", FALLBACK_SLOT_COUNT, FALLBACK_MISCOPIED] * 50
    reasons = iter(given)
    plain_segment = engine.segment

    def segment(*args, **kwargs):
        return dataclasses.replace(plain_segment(*args, **kwargs), fallback=next(reasons))

    engine.segment = segment
    _, stats = evaluate(engine, samples, progress=False)
    n = stats["conversations"]
    assert n >= 4
    assert stats["fallbacks"] == sum(bool(r) for r in given[:n])
    assert stats["miscopied"] == given[:n].count(FALLBACK_MISCOPIED)


def test_best_threshold_maximises_the_criterion_and_ties_go_to_gsva_s_rule():
    rows = [{"threshold": t, "giou": g, "ciou": 0.1} for t, g in
            [(0.3, 0.4), (0.5, 0.6), (0.7, 0.6), (0.9, 0.2)]]
    assert best_threshold(rows)["threshold"] == 0.5
    rows[2]["giou"] = 0.61
    assert best_threshold(rows)["threshold"] == 0.7
    with pytest.raises(ValueError):
        best_threshold([{"threshold": 0.5, "giou": None}])


def test_cli_prints_the_sweep_and_writes_the_choice(tiny_model_dir, val_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert main(["calibrate", "--data", str(val_dir), "--model", str(model), "--thresholds",
                 "0.7,0.3", "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out
    assert "<- best" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert [r["threshold"] for r in result["sweep"]] == [0.3, 0.7]
    assert result["written"] is None
    assert GSVAConfig.load(model / "config.json").presence_threshold == 0.5  # untouched

    assert main(["calibrate", "--data", str(val_dir), "--model", str(model), "--thresholds",
                 "0.7,0.3", "--device", "cpu", "--write", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    chosen = result["best"]["threshold"]
    assert result["written"] == str(model / "config.json")
    assert GSVAConfig.load(model / "config.json").presence_threshold == chosen
    assert GSVAEngine(model, device="cpu").presence_threshold == chosen


@pytest.mark.parametrize("bad", ["0,0.5", "1.2", "x", ""])
def test_cli_refuses_bad_thresholds(val_dir, capsys, bad):
    with pytest.raises(SystemExit) as info:
        main(["calibrate", "--data", str(val_dir), "--thresholds", bad])
    assert info.value.code == 2 and "--thresholds" in capsys.readouterr().err
