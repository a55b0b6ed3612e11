"""gsva-ros synth → train → eval on a few samples (CPU, small config)."""

from __future__ import annotations

import json

import pytest

from gsva_ros.cli.main import main
from gsva_ros.model.config import tiny


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    assert main(["synth", "--out", str(out), "--n", "6", "--seed", "5", "--max-size", "160"]) == 0
    return out


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    cfg = tiny()
    cfg.sam_image_size, cfg.sam_depth, cfg.sam_global_attn_indexes = 128, 1, [0]
    cfg.num_hidden_layers, cfg.vision_num_hidden_layers = 1, 2
    path = tmp_path_factory.mktemp("cfg") / "small.json"
    cfg.save(path)
    return path


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "loss_log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_saves_a_loadable_model(small_data, small_config, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(small_data), "--config", str(small_config), "--out", str(out),
            "--steps", "40", "--batch-size", "4", "--lr", "2e-3", "--warmup", "5",
            "--save-every", "20", "--vocab-size", "300"]
    assert main(args) == 0
    log = _log(out)
    assert [r["step"] for r in log][-1] == 40
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-2:]) / 2
    assert last < 0.8 * first, (first, last)
    from gsva_ros.engine import GSVAEngine

    engine = GSVAEngine(out, device="cpu")
    assert engine.config.sam_image_size == 128 and len(engine.tokenizer) <= 300
    # resume continues from the saved state instead of starting over
    assert main([*args[:-6], "--steps", "50", "--save-every", "20", "--vocab-size", "300",
                 "--resume"]) == 0
    steps = [r["step"] for r in _log(out)]
    assert steps[-1] == 50 and steps.count(10) == 1


def test_eval_cli_json(small_data, small_config, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["train", "--data", str(small_data), "--config", str(small_config), "--out",
                 str(out), "--steps", "2", "--batch-size", "2", "--vocab-size", "300"]) == 0
    capsys.readouterr()
    for protocol in ("strict", "lenient"):
        assert main(["eval", "--data", str(small_data), "--model", str(out), "--device", "cpu",
                     "--protocol", protocol, "--json"]) == 0
        text = capsys.readouterr().out
        assert "gIoU" in text and "no-target" in text
        result = json.loads(text.strip().splitlines()[-1])
        assert list(result)[-1] == "count" and result["count"] > 0
        assert {"giou", "ciou", "n_acc", "t_acc"} <= set(result)
        assert 0.0 <= result["giou"] <= 1.0
        # the synthetic scenes name each sentence's template family: a second table and
        # per_kind, whose counts add up to every expression
        assert "kind" in text and "color-shape" in text
        kinds = result["per_kind"]
        assert sum(k["count"] for k in kinds.values()) == result["count"]
        assert all((k["n_acc"] is None) != name.startswith("absent-") for name, k in kinds.items())
    # generate: the header says whether written phrases are checked, the summary counts
    # fallbacks by reason (an unchecked run never falls back for a mis-copied phrase)
    for flag, state in (([], "on"), (["--unchecked-phrases"], "off")):
        assert main(["eval", "--data", str(small_data), "--model", str(out), "--limit", "6",
                     "--decoding", "generate", *flag]) == 0
        text = capsys.readouterr().out
        assert "decoding generate | protocol strict" in text and f"phrase check {state}" in text
        if state == "off":
            assert "(0 for mis-copied phrases)" in text
    assert main(["eval", "--data", str(small_data), "--model", str(out),
                 "--presence-threshold", "0.999999", "--json"]) == 0
    text = capsys.readouterr().out
    assert "presence threshold 0.999999" in text
    result = json.loads(text.strip().splitlines()[-1])
    assert result["t_acc"] == 0.0 and result["n_acc"] in (1.0, None)
    assert main(["eval", "--data", str(small_data), "--model", str(out),
                 "--presence-threshold", "1"]) == 2
    assert "--presence-threshold must be in (0, 1)" in capsys.readouterr().out
    # the node's speckle filter: an area no object reaches leaves every [SEG] empty → absent
    assert main(["eval", "--data", str(small_data), "--model", str(out),
                 "--min-object-area", str(10**9), "--json"]) == 0
    text = capsys.readouterr().out
    assert f"min object area {10**9} px" in text
    assert json.loads(text.strip().splitlines()[-1])["t_acc"] == 0.0
    assert main(["eval", "--data", str(small_data), "--model", str(out),
                 "--min-object-area", "-1"]) == 2
    assert "--min-object-area must be >= 0" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag,value",
    [("--slot-weight", "0"), ("--bce-weight", "-1"), ("--aux-lm", "-0.5"), ("--aux-lm-rows", "0"),
     ("--phrase-aux", "-1"), ("--decoder-lr-scale", "0"),
     ("--rej-mask-weight", "-1"), ("--category-aux", "-1"), ("--short-share", "1.5"),
     ("--short-share", "-0.1"), ("--min-slots", "6")],
)
def test_train_refuses_bad_options(small_data, tmp_path, capsys, flag, value):
    out = tmp_path / "never"
    assert main(["train", "--data", str(small_data), "--out", str(out), flag, value]) == 2
    assert flag in capsys.readouterr().out
    assert not out.exists()


def test_slot_weight_reaches_the_training_loss(small_data, small_config, tmp_path):
    """Same seed and data: only the slot-token CE weight differs, so only the CE differs."""
    logs = {}
    for w in ("1", "8"):
        out = tmp_path / f"w{w}"
        assert main(["train", "--data", str(small_data), "--config", str(small_config),
                     "--out", str(out), "--steps", "1", "--batch-size", "2", "--vocab-size",
                     "300", "--slot-weight", w]) == 0
        logs[w] = _log(out)[0]
    assert logs["1"]["bce"] == pytest.approx(logs["8"]["bce"])
    assert logs["1"]["ce"] != pytest.approx(logs["8"]["ce"])


def test_pretrain_lm_runs_first_and_not_again_on_resume(small_data, small_config, tmp_path):
    out = tmp_path / "pre"
    base = ["train", "--data", str(small_data), "--config", str(small_config), "--out", str(out),
            "--batch-size", "2", "--vocab-size", "300", "--save-every", "2", "--pretrain-lm", "4"]
    assert main([*base, "--steps", "2"]) == 0
    pre = (out / "pretrain_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in pre] == [1, 2, 3, 4]
    assert main([*base, "--steps", "3", "--resume"]) == 0
    assert (out / "pretrain_log.jsonl").read_text().splitlines() == pre
    assert _log(out)[-1]["step"] == 3
