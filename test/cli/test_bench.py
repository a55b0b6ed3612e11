"""``gsva-ros bench``: the CPU benchmark runs end to end on a random tiny model and prints its
JSON keys; the GPU benchmark's code path runs on CPU with the tiny geometry. No timing is
asserted (the CI machine is shared): only keys, shapes and files.
"""

from __future__ import annotations

import json
import math

import pytest

from gsva_ros.cli.main import build_parser, main

CPU_KEYS = {"engine_ms_p50", "cached_ms_p50", "node_ms_p50", "node_over_engine"}


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_bench_is_registered():
    args = build_parser().parse_args(["bench", "cpu", "--commands", "3", "--json"])
    assert args.bench == "cpu" and args.commands == 3 and args.json
    args = build_parser().parse_args(["bench", "gpu", "--geometry", "13b", "--out", "x"])
    assert args.geometry == "13b" and args.out == "x"


def test_bench_cpu_prints_the_json_keys_last(tiny_model_dir, capsys):
    rc = main(["bench", "cpu", "--model", str(tiny_model_dir), "--commands", "2", "--json",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    result = _last_json(out)
    assert CPU_KEYS <= set(result)
    assert result["engine_ms_p50"] > 0 and result["cached_ms_p50"] > 0
    assert "p50" in out and "engine, cached frame" in out  # the summary table
    if result["node_ms_p50"] is not None:  # ROS available: the node answered every command
        assert result["node"]["n"] == 2
        assert math.isclose(result["node_over_engine"],
                            result["node_ms_p50"] / result["engine_ms_p50"], rel_tol=1e-2)
    else:
        assert result["node_error"]


def test_bench_cpu_without_node_and_with_a_missing_model(tiny_model_dir, tmp_path, capsys):
    assert main(["bench", "cpu", "--model", str(tiny_model_dir), "--commands", "1", "--json",
                 "--no-node", "--no-progress"]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["node_ms_p50"] is None and result["node_over_engine"] is None
    assert main(["bench", "cpu", "--model", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "--model DIR" in capsys.readouterr().err


def test_bench_gpu_code_path_on_cpu_with_the_tiny_geometry(tmp_path, capsys):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nintro\n")
    rc = main(["bench", "gpu", "--geometry", "tiny", "--device", "cpu", "--reps", "1",
               "--no-eager", "--out", str(tmp_path), "--docs", str(docs), "--json"])
    assert rc == 0
    result = _last_json(capsys.readouterr().out)
    assert {"plain", "engine", "ratios", "targets", "environment"} <= set(result)
    eng = result["engine"]
    for key in ("sam_encoder_ms", "clip_tower_ms", "prefix_prefill_ms", "decode_ms_per_token",
                "mask_decoder_3_ms", "slots_fresh_best", "slots_cached_worst",
                "generate20_fresh", "generate20_cached"):
        assert key in eng, key
    assert eng["slot_passes_best"] == 1 and eng["slot_passes_worst"] == 3  # 3 expressions
    assert "notes" not in eng  # forced generation produced the right slot count
    assert {"plain_command_ms", "cached_second_command_ms", "decode_ms_per_token"} <= set(
        result["plain"])
    text = docs.read_text()
    assert text.startswith("# Benchmarks") and "gpu-results-tiny:begin" in text
    assert "| SAM image encoder |" in text
    assert (tmp_path / "bench_gpu_tiny.json").is_file()

    # re-rendering from the JSON replaces the section instead of appending a second one
    assert main(["bench", "gpu", "--from-json", str(tmp_path / "bench_gpu_tiny.json"),
                 "--out", str(tmp_path / "again"), "--docs", str(docs)]) == 0
    assert docs.read_text().count("gpu-results-tiny:begin") == 1


def test_bench_gpu_refuses_full_geometry_without_cuda(capsys):
    assert main(["bench", "gpu", "--geometry", "7b", "--device", "cpu"]) == 2
    assert "GPU" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench"], ["bench", "tpu"]])
def test_bench_usage_errors(argv):
    with pytest.raises(SystemExit):
        main(argv)


def test_standalone_module_entry_point_parses(capsys):
    from gsva_ros.cli import bench

    with pytest.raises(SystemExit) as exc:
        bench.main(["gpu", "--help"])
    assert exc.value.code == 0 and "--geometry" in capsys.readouterr().out
