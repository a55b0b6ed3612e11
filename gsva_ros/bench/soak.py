"""``gsva-ros bench soak``: camera-rate images and a steady trickle of commands for M minutes.

A node that survives a burst can still leak, slow down or go silent after an hour. The soak
publishes images at 30 Hz and commands at 2 Hz (both adjustable) to an in-process ``gsva``
node and reports, per window (a minute by default):

- commands sent, answered (any ``Segmentation``), errors, end-to-end latency p50/p99;
- the process RSS at the end of the window.

The summary compares the RSS after warm-up (allocator pools, torch workspaces and the frame
caches fill during the first window) with the RSS at the end: the target is < 5 % growth and
100 % of the commands answered without error. ``--json`` prints one JSON object last; the exit
status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from gsva_ros.bench.robustness import (
    InProcessNode,
    good_image,
    parse_size,
    rate_loop,
    rss_bytes,
)

COMMANDS = (
    "the red mug",
    "the spoon and the knife",
    "the mug, the spoon and the knife",
    "the leftmost object",
    "all blue squares",
)


@dataclass
class Window:
    """One row of the soak table (commands are binned by the time they were sent)."""

    index: int
    start_s: float
    sent: int = 0
    answered: int = 0
    errors: int = 0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    rss_mb: float = 0.0


@dataclass
class SoakReport:
    minutes: float
    image_hz: float
    command_hz: float
    window_s: float
    warmup_s: float
    images_sent: int = 0
    frames_received: int = 0
    sent: int = 0
    answered: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    answered_pct: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p99_ms: float = 0.0
    rss_start_mb: float = 0.0
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_growth_pct: float = 0.0
    windows: list[Window] = field(default_factory=list)
    ok: bool = False


@dataclass
class _Sent:
    command: str
    t: float  # seconds since the soak started
    sent_at: float  # time.monotonic()


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Options of ``gsva-ros bench soak``."""
    p.description = (
        "Soak an in-process gsva node: images at --image-hz and commands at --command-hz for "
        "--minutes. Reports answered vs sent, errors, latency p50/p99 per window and RSS "
        "growth after warm-up (targets: 100%% answered, < --max-rss-growth-pct)."
    )
    p.add_argument("--minutes", type=float, default=10.0, help="soak duration (default: 10)")
    p.add_argument("--model", default="tiny",
                   help="bundled model name or model directory (default: tiny)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--image-hz", type=float, default=30.0, help="image rate (default: 30)")
    p.add_argument("--command-hz", type=float, default=2.0, help="command rate (default: 2)")
    p.add_argument("--size", default="640x480", metavar="WxH",
                   help="image size (default: 640x480)")
    p.add_argument("--window-s", type=float, default=60.0, metavar="S",
                   help="length of one table row (default: 60)")
    p.add_argument("--warmup-s", type=float, default=None, metavar="S",
                   help="RSS growth is measured from here (default: min(60, 20%% of the run))")
    p.add_argument("--max-rss-growth-pct", type=float, default=5.0, metavar="PCT",
                   help="RSS growth after warm-up above this fails the soak (default: 5)")
    p.add_argument("--drain-s", type=float, default=120.0, metavar="S",
                   help="after the last command, wait this long for answers (default: 120)")
    p.add_argument("--node-log-level", default="warn",
                   choices=["debug", "info", "warn", "error", "fatal"],
                   help="log level of the node under test (default: warn)")
    p.add_argument("--json", action="store_true", help="print one JSON object last")


def run(args: argparse.Namespace) -> int:
    """``gsva-ros bench soak``: 0 when every command was answered without error and RSS stayed
    within ``--max-rss-growth-pct`` after warm-up."""
    if args.minutes <= 0 or args.image_hz <= 0 or args.command_hz <= 0 or args.window_s <= 0:
        print("gsva-ros bench soak: --minutes, --image-hz, --command-hz and --window-s must be "
              "positive", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    node = InProcessNode(args.model, args.device, log_level=args.node_log_level, compact=True)
    try:
        if not node.start():
            print(f"gsva-ros bench soak: cannot start the node with model {args.model!r} "
                  "(reason logged above)", file=sys.stderr)
            return 2
        report = soak(node, args, size)
    finally:
        node.close()
    print(_table(report))
    print(_summary(report, args.max_rss_growth_pct))
    if args.json:
        print(json.dumps(asdict(report)))
    return 0 if report.ok else 1


def soak(node: InProcessNode, args: argparse.Namespace, size: tuple[int, int]) -> SoakReport:
    """Run the soak against a started node (see the module docstring)."""
    from tqdm import tqdm

    duration = args.minutes * 60.0
    warmup = args.warmup_s if args.warmup_s is not None else min(60.0, 0.2 * duration)
    report = SoakReport(args.minutes, args.image_hz, args.command_hz, args.window_s, warmup)
    frames = [good_image(size[0], size[1], seed=s) for s in range(8)]
    # One answered command before the clock starts: model load and first-inference costs are
    # not part of the soak.
    node.publish_image(frames[0])
    if node.ask("the mug", timeout=args.drain_s) is None:
        raise RuntimeError("the node did not answer the warm-up command")
    node.forget_answers()
    frames_before = node.node.stats()["frames_received"]
    report.rss_start_mb = rss_bytes() / 2**20

    sent: list[_Sent] = []
    rss_samples: list[tuple[float, int]] = []  # (seconds since start, bytes)
    stop = threading.Event()
    counters = {"images": 0}
    t0 = time.monotonic()

    def send_image(i: int) -> None:
        node.publish_image(frames[i % len(frames)], wait=False)
        counters["images"] += 1

    def send_command(i: int) -> None:
        # Unique text per command: answers are matched to commands by it.
        command = f"{COMMANDS[i % len(COMMANDS)]} #{i}"
        now = time.monotonic()
        sent.append(_Sent(command, now - t0, now))
        node.publish_command(command)

    threads = [
        threading.Thread(target=rate_loop, args=(args.image_hz, stop, send_image), daemon=True),
        threading.Thread(target=rate_loop, args=(args.command_hz, stop, send_command),
                         daemon=True),
    ]
    for t in threads:
        t.start()
    with tqdm(total=round(duration), desc="soak", unit="s", file=sys.stderr) as bar:
        while (elapsed := time.monotonic() - t0) < duration:
            time.sleep(min(1.0, duration - elapsed))
            now = time.monotonic() - t0
            rss_samples.append((now, rss_bytes()))
            done = sum(1 for s in list(sent) if node.count(s.command))
            bar.set_postfix(sent=len(sent), answered=done,
                            rss=f"{rss_samples[-1][1] / 2**20:.0f}MB", refresh=False)
            bar.update(min(round(duration), round(now)) - bar.n)
    stop.set()
    for t in threads:
        t.join(timeout=10.0)
    deadline = time.monotonic() + args.drain_s
    while time.monotonic() < deadline and any(node.count(s.command) == 0 for s in sent):
        time.sleep(0.05)
    rss_samples.append((time.monotonic() - t0, rss_bytes()))
    report.images_sent = counters["images"]
    report.frames_received = node.node.stats()["frames_received"] - frames_before
    _fill(report, node, sent, rss_samples, duration)
    report.ok = (report.sent > 0 and report.answered == report.sent and report.errors == 0
                 and report.rss_growth_pct <= args.max_rss_growth_pct)
    return report


def _fill(report: SoakReport, node: InProcessNode, sent: list[_Sent],
          rss_samples: list[tuple[float, int]], duration: float) -> None:
    """Counts, latencies, windows and RSS figures from the raw records."""
    n_windows = max(1, int(np.ceil(duration / report.window_s)))
    windows = [Window(i, i * report.window_s) for i in range(n_windows)]
    latencies: list[float] = []
    per_window: list[list[float]] = [[] for _ in windows]
    for s in sent:
        w = min(int(s.t // report.window_s), n_windows - 1)
        windows[w].sent += 1
        answers = node.answers_for(s.command)
        if not answers:
            continue
        windows[w].answered += 1
        answer = answers[0]
        if answer.error:
            windows[w].errors += 1
            key = answer.error[:120]
            report.error_kinds[key] = report.error_kinds.get(key, 0) + 1
            continue
        latency = (answer.received - s.sent_at) * 1e3
        latencies.append(latency)
        per_window[w].append(latency)
    for w, lat in zip(windows, per_window, strict=True):
        if lat:
            w.latency_p50_ms, w.latency_p99_ms = _percentiles(lat)
        w.rss_mb = _median_rss(rss_samples, w.start_s, w.start_s + report.window_s) / 2**20
    report.windows = windows
    report.sent = sum(w.sent for w in windows)
    report.answered = sum(w.answered for w in windows)
    report.errors = sum(w.errors for w in windows)
    report.answered_pct = 100.0 * report.answered / report.sent if report.sent else 0.0
    if latencies:
        report.latency_p50_ms, report.latency_p99_ms = _percentiles(latencies)
    # RSS swings by tens of MB within one inference (activations come and go), so single
    # samples would compare a peak with a trough: medians over a span are compared instead.
    span = max(3.0, min(60.0, 0.1 * duration))
    warm_rss = _median_rss(rss_samples, report.warmup_s, report.warmup_s + span)
    end_rss = _median_rss(rss_samples, duration - span, float("inf"))
    report.rss_warm_mb = warm_rss / 2**20
    report.rss_end_mb = end_rss / 2**20
    report.rss_peak_mb = max(b for _, b in rss_samples) / 2**20
    report.rss_growth_pct = 100.0 * (end_rss - warm_rss) / warm_rss


def _median_rss(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Median RSS (bytes) of the samples taken in [start, end]; the nearest sample if none."""
    inside = [b for t, b in samples if start <= t <= end]
    if not inside:
        inside = [min(samples, key=lambda s: abs(s[0] - start))[1]]
    return float(np.median(inside))


def _percentiles(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _table(r: SoakReport) -> str:
    unit = "min" if r.window_s == 60.0 else f"{r.window_s:g}s"
    rows = [(f"window ({unit})", "sent", "answered", "errors", "p50 ms", "p99 ms", "RSS MB")]
    for w in r.windows:
        rows.append((str(w.index), str(w.sent), str(w.answered), str(w.errors),
                     f"{w.latency_p50_ms:.0f}", f"{w.latency_p99_ms:.0f}", f"{w.rss_mb:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(wd) for c, wd in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def _summary(r: SoakReport, max_growth: float) -> str:
    lines = [
        f"soak {r.minutes:g} min: {r.images_sent} images sent ({r.image_hz:g} Hz), "
        f"{r.frames_received} received; {r.sent} commands sent ({r.command_hz:g} Hz), "
        f"{r.answered} answered ({r.answered_pct:.1f} %), {r.errors} errors",
        f"latency p50 {r.latency_p50_ms:.0f} ms, p99 {r.latency_p99_ms:.0f} ms",
        f"RSS {r.rss_start_mb:.0f} MB at start, {r.rss_warm_mb:.0f} MB after "
        f"{r.warmup_s:g} s warm-up, {r.rss_end_mb:.0f} MB at end (medians; peak "
        f"{r.rss_peak_mb:.0f}); "
        f"growth {r.rss_growth_pct:+.1f} % (target < {max_growth:g} %)",
    ]
    lines += [f"error x{n}: {text}" for text, n in r.error_kinds.items()]
    lines.append("RESULT: " + ("PASS" if r.ok else "FAIL"))
    return "\n".join(lines)

