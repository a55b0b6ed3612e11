"""``gsva-ros bench``: latency benchmarks (``docs/benchmarks.md``).

    gsva-ros bench cpu [--json] [--model tiny|DIR] [--commands N]
    gsva-ros bench gpu [--geometry 7b|13b] [--json] [--out DIR]
    gsva-ros bench gpu --from-json OUT/bench_gpu_7b.json   # re-render docs from a GPU run
    gsva-ros bench robustness [--model DIR] [--json]        # bad-input corpus + flood
    gsva-ros bench soak --minutes M [--json]                # long run: latency, RSS growth
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

EPILOG = (
    "examples:\n"
    "  gsva-ros bench cpu --model models/tiny --commands 20\n"
    "  gsva-ros bench cpu --json > cpu.json          # JSON object on the last line\n"
    "  gsva-ros bench gpu --geometry 7b --out $OUT   # needs a CUDA GPU and segment_anything\n"
)


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="measure command latency (engine, ROS node, GPU vs the plain pipeline)",
        description="Latency benchmarks. 'cpu': a small model on this machine, engine and ROS "
        "node. 'gpu': a random-weight GSVA-7B/13B against transformers generate + "
        "segment_anything in the same run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="bench", metavar="{cpu,gpu,robustness,soak}", required=True)

    cpu = sub.add_parser("cpu", help="engine (fresh/cached frame) and ROS node on this machine")
    cpu.add_argument("--model", default="tiny", help="bundled model name or model directory")
    cpu.add_argument("--commands", type=int, default=20, help="commands per series")
    cpu.add_argument("--no-node", action="store_true", help="skip the ROS node series")
    cpu.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    cpu.add_argument("--json", action="store_true", help="print one JSON object last")
    cpu.add_argument("--no-progress", action="store_true", help="no progress bars")

    gpu = sub.add_parser("gpu", help="random-weight full-size model vs the plain pipeline")
    gpu.add_argument("--geometry", choices=["7b", "13b", "tiny"], default="7b",
                     help="model geometry (tiny: CPU smoke test of the benchmark itself)")
    gpu.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny only)")
    gpu.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement")
    gpu.add_argument("--out", default=os.environ.get("OUT", "."),
                     help="folder for bench_gpu_<geometry>.json/.md (default $OUT or .)")
    gpu.add_argument("--docs", default="docs/benchmarks.md",
                     help="markdown file whose GPU section is updated ('' = none)")
    gpu.add_argument("--no-plain", action="store_true", help="skip the plain pipeline")
    gpu.add_argument("--no-eager", action="store_true", help="skip the eager-engine series")
    gpu.add_argument("--quantize", choices=["none", "int8", "nf4"], default="none",
                     help="also measure bitsandbytes LLM weights (needs bitsandbytes)")
    gpu.add_argument("--from-json", default=None, metavar="FILE",
                     help="no measurement: update --docs from a bench_gpu_*.json")
    gpu.add_argument("--json", action="store_true", help="print one JSON object last")

    from gsva_ros.bench import robustness, soak  # argparse-only imports, no torch/rclpy

    robustness.configure_parser(
        sub.add_parser("robustness", help="bad-input corpus and topic flood against the node")
    )
    soak.configure_parser(sub.add_parser("soak", help="30 Hz images + 2 Hz commands for M minutes"))
    return p


def run(args: argparse.Namespace) -> int:
    if args.bench == "cpu":
        return _run_cpu(args)
    if args.bench == "robustness":
        from gsva_ros.bench import robustness

        return robustness.run(args)
    if args.bench == "soak":
        from gsva_ros.bench import soak

        return soak.run(args)
    return _run_gpu(args)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run_cpu(args: argparse.Namespace) -> int:
    import torch

    from gsva_ros.bench.common import fmt_ms, table
    from gsva_ros.bench.cpu import BenchError, run_cpu_bench

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        result = run_cpu_bench(args.model, args.commands, node=not args.no_node,
                               progress=not args.no_progress, log=_err)
    except BenchError as exc:
        _err(f"error: {exc}")
        return 2
    rows: list[list[Any]] = []
    for label, key in (("engine, fresh frame", "engine"), ("engine, cached frame", "cached"),
                       ("ROS node, fresh frame", "node")):
        s = result.get(key)
        rows.append([label] + ([fmt_ms(s["p50"]), fmt_ms(s["p95"]), fmt_ms(s["min"]), s["n"]]
                               if s else ["—", "—", "—", 0]))
    print(table(["series (ms)", "p50", "p95", "min", "n"], rows))
    ratio = result["node_over_engine"]
    if ratio is not None:
        verdict = "ok" if ratio <= 1.10 else "above the 1.10 target"
        print(f"node / engine (p50): {ratio:.3f} ({verdict}); by minimum, the figure least "
              f"disturbed by other load: {result['node_over_engine_min']:.3f}")
    elif result.get("node_error"):
        print(f"node: not measured ({result['node_error']})")
    print(f"model {result['model']}, {result['torch_threads']} torch threads, load average "
          f"{result['environment'].get('load_avg_1m', '?')}")
    if args.json:
        print(json.dumps(_json_safe(result)))
    return 0


def _run_gpu(args: argparse.Namespace) -> int:
    from gsva_ros.bench.gpu import run_gpu_bench, write_outputs

    docs = args.docs or None
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        write_outputs(result, args.out, docs, log=print)
        return 0
    if args.geometry != "tiny" and not args.device.startswith("cuda"):
        _err("error: the 7b/13b geometries are GPU benchmarks (use --geometry tiny on CPU)")
        return 2
    try:
        result = run_gpu_bench(args.geometry, args.device, args.reps, args.out, docs,
                               plain=not args.no_plain, eager=not args.no_eager,
                               quantize=args.quantize, log=lambda s: print(s, flush=True))
    except RuntimeError as exc:
        _err(f"error: {exc}")
        return 2
    if args.json:
        print(json.dumps(_json_safe(result), default=str))
    return 0


def _json_safe(obj: Any) -> Any:
    """NaN/inf → None so the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    """``python -m gsva_ros.cli.bench gpu ...``: the bench without the other subcommands.

    The GPU machine runs this form: it imports nothing but the benchmark (no ROS there).
    """
    parser = argparse.ArgumentParser(prog="gsva-ros")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub, "bench")
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
