"""Shared helpers of the benchmark scripts: timing with compile excluded, JSON lines."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_fn(fn, *args, reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn(*args)`` in seconds, blocking on the result, compile excluded."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def emit(record: dict) -> None:
    """Print one JSON line (the machine-readable result) and flush."""
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v)
                      for k, v in record.items()}), flush=True)
