"""``gsva-ros bench soak``: a few seconds through ``run(args)``, plus its report arithmetic.

The real soak lasts minutes to hours; here it runs ~3 s against the tiny test checkpoint and
checks the contract: every command answered, a JSON object printed last with the documented
keys, one table row per window. Timings are never asserted.
"""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("rclpy")
pytest.importorskip("gsva_ros.msg", reason="interfaces not built: run `make setup`")

from gsva_ros.bench import soak  # noqa: E402
from gsva_ros.bench.robustness import Answer  # noqa: E402

REPORT_KEYS = {
    "minutes", "image_hz", "command_hz", "window_s", "warmup_s", "images_sent",
    "frames_received", "sent", "answered", "errors", "error_kinds", "answered_pct",
    "latency_p50_ms", "latency_p99_ms", "rss_start_mb", "rss_warm_mb", "rss_end_mb",
    "rss_peak_mb", "rss_growth_pct", "windows", "ok",
}
WINDOW_KEYS = {"index", "start_s", "sent", "answered", "errors", "latency_p50_ms",
               "latency_p99_ms", "rss_mb"}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    soak.configure_parser(parser)
    return parser.parse_args(list(argv))


def test_short_soak_answers_every_command_and_prints_json_last(tiny_model_dir, capsys):
    args = parse("--minutes", "0.05", "--model", str(tiny_model_dir), "--device", "cpu",
                 "--size", "64x48", "--window-s", "1", "--image-hz", "30", "--command-hz", "2",
                 # 3 s are all warm-up noise: the RSS target is for real runs.
                 "--max-rss-growth-pct", "100", "--json")
    assert soak.run(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert set(report) == REPORT_KEYS
    assert report["sent"] >= 4 and report["answered"] == report["sent"]
    assert report["errors"] == 0 and report["answered_pct"] == 100.0 and report["ok"] is True
    assert report["images_sent"] > 0 and report["frames_received"] > 0
    assert report["latency_p99_ms"] >= report["latency_p50_ms"] > 0
    assert len(report["windows"]) == 3
    for w in report["windows"]:
        assert set(w) == WINDOW_KEYS
    assert sum(w["sent"] for w in report["windows"]) == report["sent"]
    assert sum(w["answered"] for w in report["windows"]) == report["answered"]
    assert "window (1s)" in captured.out and "RESULT: PASS" in captured.out
    assert "soak" in captured.err  # tqdm progress goes to stderr, never into the JSON


def test_invalid_options_and_a_missing_model_exit_2(tmp_path, capsys):
    assert soak.run(parse("--minutes", "0")) == 2
    assert soak.run(parse("--command-hz", "-1")) == 2
    assert soak.run(parse("--minutes", "0.01", "--device", "cpu",
                          "--model", str(tmp_path / "no_model"))) == 2
    assert "cannot start the node" in capsys.readouterr().err


class _FakeNode:
    def __init__(self, answers: dict[str, Answer]) -> None:
        self._answers = answers

    def answers_for(self, command: str) -> list[Answer]:
        return [self._answers[command]] if command in self._answers else []


def _answer(command: str, received: float, error: str = "") -> Answer:
    return Answer(command, error, "", [], [], 0.0, received, (0, 0))


def test_report_bins_commands_by_window_and_measures_rss_after_warm_up():
    sent = [soak._Sent(f"c{i}", t, 100.0 + t) for i, t in enumerate([0.5, 1.5, 2.5, 3.5])]
    answers = {
        "c0": _answer("c0", 100.6),  # 100 ms
        "c1": _answer("c1", 101.8),  # 300 ms
        "c2": _answer("c2", 102.6, error="command queue full (10)"),
        # c3 never answered
    }
    report = soak.SoakReport(minutes=20 / 60, image_hz=30, command_hz=1, window_s=2.0,
                             warmup_s=1.0)
    mb = 2**20
    # Start-up jump, a plateau, then +10 MB: one sample per second for 20 s.
    rss = [(float(t), (100 if t == 0 else 200 if t <= 10 else 210) * mb) for t in range(21)]
    soak._fill(report, _FakeNode(answers), sent, rss, duration=20.0)
    assert len(report.windows) == 10
    assert [(w.sent, w.answered, w.errors) for w in report.windows[:2]] == [(2, 2, 0), (2, 1, 1)]
    assert all(w.sent == 0 for w in report.windows[2:])
    assert (report.sent, report.answered, report.errors) == (4, 3, 1)
    assert report.answered_pct == 75.0
    assert report.error_kinds == {"command queue full (10)": 1}
    assert report.latency_p50_ms == pytest.approx(200.0)
    assert report.windows[0].latency_p50_ms == pytest.approx(200.0)
    # Warm-up excludes the start-up jump (100 → 200 MB); medians over 3 s spans.
    assert report.rss_warm_mb == pytest.approx(200.0)
    assert report.rss_end_mb == pytest.approx(210.0)
    assert report.rss_growth_pct == pytest.approx(5.0)
    assert report.windows[0].rss_mb == pytest.approx(200.0)  # median of 100, 200, 200
    assert report.rss_peak_mb == pytest.approx(210.0)
