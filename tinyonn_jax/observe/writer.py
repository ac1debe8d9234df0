"""Metric logging: TensorBoard event files, a ``metrics.jsonl`` stream and an in-memory history.

The training step returns a flat dict of scalars computed inside jit (``train/main_loss``,
``route/avg_k/attn_q``, ...). ``MetricsWriter.scalars`` fetches them from the device in one
transfer and fans them out to

* TensorBoard (tensorboardX), for fine-grained inspection;
* ``<logdir>/metrics.jsonl``, one JSON object per call (``{"step": s, "time": t, name: value}``),
  which is trivial to load with pandas or ``json`` when TensorBoard is not at hand;
* ``history`` (name -> list of (step, value)), which the matplotlib dashboards plot.

Only process 0 should write (``enabled=jax.process_index() == 0``). A disabled writer touches no
file but still keeps ``history``, so notebooks and tests can plot without a log directory.

A run that restarts from step ``s`` opens the writer with ``purge_step=s + 1``: TensorBoard then
hides the events of steps ``>= s + 1`` written before the restart, and ``metrics.jsonl`` is
rewound by the caller (``tinyonn_jax.workdir.rewind_jsonl``), so every step appears once.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np

History = dict[str, list[tuple[int, float]]]

JSONL_NAME = "metrics.jsonl"


def _to_float(name: str, value: Any) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(
            f"metric {name!r} has shape {arr.shape}; scalars() takes scalars only, "
            "log arrays with histogram()"
        )
    return float(arr.reshape(()))


def load_history(path: str | Path) -> History:
    """Read a ``metrics.jsonl`` back into a history (e.g. to plot a finished or resumed run).

    ``null`` values come back as NaN, which matplotlib draws as gaps.
    """
    history: History = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            step = int(record.pop("step"))
            record.pop("time", None)
            for name, v in record.items():
                history.setdefault(name, []).append((step, math.nan if v is None else float(v)))
    return history


class MetricsWriter:
    """Write scalar metrics to TensorBoard and ``metrics.jsonl`` and keep their history.

    Args:
        logdir: directory of the event files and of ``metrics.jsonl`` (created if enabled).
        enabled: write files only if true (process 0 of a multi-host run).
        flush_secs: how often tensorboardX flushes event files in the background.
    """

    def __init__(self, logdir: str | Path, *, enabled: bool = True, flush_secs: int = 30,
                 purge_step: int | None = None) -> None:
        self.logdir = Path(logdir)
        self.enabled = enabled
        self.history: History = {}
        self._tb = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter  # deferred: disabled writers need no TB

            self.logdir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(self.logdir), flush_secs=flush_secs,
                                     purge_step=purge_step)
            # Line buffering: a crashed run keeps every line written before the crash.
            self._jsonl = open(self.logdir / JSONL_NAME, "a", buffering=1, encoding="utf-8")

    def scalars(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Record one step of scalar metrics (floats or 0-d / size-1 arrays, on any device).

        Non-finite values go to TensorBoard and ``history`` as they are and to
        ``metrics.jsonl`` as ``null`` (JSON has no NaN). Returns the host floats.
        """
        step = int(step)
        host = jax.device_get(dict(metrics))  # one transfer for all device scalars
        values = {name: _to_float(name, v) for name, v in host.items()}
        for name, v in values.items():
            self.history.setdefault(name, []).append((step, v))
        if self._tb is not None and self._jsonl is not None:
            for name, v in values.items():
                self._tb.add_scalar(name, v, step)
            record = {"step": step, "time": time.time()}
            record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
            self._jsonl.write(json.dumps(record) + "\n")
        return values

    def histogram(self, step: int, name: str, values: Any) -> None:
        """Record the distribution of an array (e.g. per-expert activation rates) in TensorBoard."""
        if self._tb is not None:
            arr = np.asarray(jax.device_get(values), dtype=np.float64).reshape(-1)
            self._tb.add_histogram(name, arr[np.isfinite(arr)], int(step))

    def text(self, step: int, name: str, text: str) -> None:
        """Record a text (e.g. the run's config) in TensorBoard's text tab."""
        if self._tb is not None:
            self._tb.add_text(name, text, int(step))

    def image(self, step: int, name: str, png_path: str | Path) -> None:
        """Record a PNG file (e.g. a dashboard) in TensorBoard's image tab."""
        if self._tb is not None:
            import matplotlib.image  # deferred: only runs that draw dashboards need it

            pixels = matplotlib.image.imread(str(png_path))  # (H, W, 3|4) floats in [0, 1]
            self._tb.add_image(name, np.asarray(pixels[..., :3]), int(step), dataformats="HWC")

    def flush(self) -> None:
        """Push buffered events to disk."""
        if self._tb is not None and self._jsonl is not None:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        """Flush and close the files; ``history`` stays readable. Idempotent."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
