"""Polling helper for tools that drive a node in-process (replay, benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    error: type[Exception] = RuntimeError,
    period: float = 0.02,
) -> None:
    """Poll ``predicate`` until it is truthy; raise ``error`` naming ``what`` after ``timeout``.

    DDS discovery can take seconds, so callers wait for matching instead of sleeping blindly.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(period)
    raise error(f"timed out after {timeout:.0f} s waiting for {what}")
