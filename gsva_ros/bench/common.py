"""Shared benchmark helpers: statistics, timers, environment, forced decisions, inputs."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Commands used by every benchmark: 1–3 expressions, like a robot operator's requests.
COMMANDS = (
    "the red mug, the spoon and the knife",
    "the person on the left",
    "all blue boxes and the chair",
    "the bottle",
    "the laptop, the phone and the cup on the table",
)
BENCH_COMMAND = COMMANDS[0]  # the 3-expression command of the GPU comparison
BONUS = 1.0e4  # added to a forced token's logit: beats any random-weight logit


def summarize(samples_ms: Sequence[float]) -> dict[str, float]:
    """Latency samples (ms) → p50, p95, mean, min, n (p95 needs no minimum sample count)."""
    a = np.asarray(list(samples_ms), dtype=np.float64)
    if a.size == 0:
        return {"p50": float("nan"), "p95": float("nan"), "mean": float("nan"),
                "min": float("nan"), "n": 0}
    return {
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "n": int(a.size),
    }


def time_device(fn: Callable[[], Any], reps: int, warm: int = 3) -> list[float]:
    """Run ``fn`` ``warm`` times, then time ``reps`` calls → milliseconds per call.

    On CUDA each call is bracketed by CUDA events and synchronised (device time of the
    work ``fn`` enqueues, host overhead included as far as it delays the queue); on CPU
    wall-clock time.
    """
    import torch

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    for _ in range(warm):
        fn()
    if cuda:
        torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def time_wall(fn: Callable[[], Any], reps: int, warm: int = 1) -> list[float]:
    """Wall-clock milliseconds of ``fn`` (which must synchronise itself, as the engine does)."""
    for _ in range(warm):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def environment() -> dict[str, Any]:
    """Versions and hardware the numbers came from."""
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda or "",
        "cpu_count": os.cpu_count() or 0,
        "platform": platform.platform(),
    }
    try:
        env["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        from importlib.metadata import version

        env["segment_anything"] = version("segment_anything")
    except Exception:  # noqa: BLE001 - informational only
        env["segment_anything"] = "unknown"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        env["gpu"] = ""
    env["argv"] = " ".join(sys.argv)
    return env


def random_images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]


def forced_head_class():
    """:class:`ForcedHead`, defined lazily so this module imports without torch."""
    import torch
    from torch import nn

    class ForcedHead(nn.Module):
        """Wraps ``lm_head``: the real logits (same cost) plus a bonus on a chosen token.

        Random weights make answers meaningless, but decoding cost depends on the answer
        ([REJ] triggers speculative re-runs; generation length). ``force(token)`` biases every
        call towards one token (``[SEG]`` = best case, ``[REJ]`` = worst case of speculative
        slot decoding); ``force(script=[...])`` forces token ``script[k]`` at call k
        (generation of an exact answer). ``force()`` restores the plain head.
        """

        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.base = base
            self.token: int | None = None
            self.script: list[int] | None = None
            self.calls = 0

        def force(self, token: int | None = None, script: Sequence[int] | None = None) -> None:
            self.token, self.script, self.calls = token, list(script) if script else None, 0

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # ...×H → ...×V
            logits = self.base(hidden)
            token = self.token
            if self.script is not None:
                token = self.script[min(self.calls, len(self.script) - 1)]
            self.calls += 1
            if token is not None:
                logits[..., token] += BONUS
            return logits

    return ForcedHead


def install_forced_head(model):
    """Replace ``model``'s lm_head by a :class:`ForcedHead` around it (idempotent)."""
    cls = forced_head_class()
    head = model.llava.lm_head
    if not isinstance(head, cls):
        head = cls(head)
        model.llava.lm_head = head
    return head


def generate_script(model_config, n_slots: int, n_tokens: int, filler: int) -> list[int]:
    """Tokens a forced generation emits: filler, then one [SEG] per expression (n_tokens in
    all), so ``generate`` yields exactly ``n_tokens`` tokens and the right slot count."""
    n_fill = max(n_tokens - n_slots, 0)
    return [filler] * n_fill + [model_config.seg_token_id] * n_slots + [model_config.eos_token_id]


def fmt_ms(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (for the terminal)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(str(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def update_markdown_section(path, marker: str, body: str) -> None:
    """Replace the text between ``<!-- marker:begin -->`` and ``<!-- marker:end -->`` in
    ``path`` (appending the section when the markers are missing)."""
    from pathlib import Path

    p = Path(path)
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = p.read_text() if p.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    p.write_text(text)
