"""Training progress: a rich progress bar on a terminal, periodic plain lines elsewhere (CI, logs).

Both show the step, the latest loss / accuracy and the throughput in tokens per second. Metrics
are logged every ``train.log_every`` steps; between log steps the shown values name the step
they come from (``loss 1.23 acc 0.41 @80``). Only process 0 should display
(``enabled=jax.process_index() == 0``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TextIO

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

# Shown fields: label -> metric names tried in order (the first present wins).
DISPLAY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("train/main_loss", "train/loss", "loss")),
    ("acc", ("train/main_acc", "train/token_acc", "train/acc", "acc")),
    ("exact", ("train/exact_acc", "exact_acc")),
)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Progress of a training run of ``total_steps`` steps.

    Args:
        total_steps: last step of the run (the bar is full at ``step == total_steps``).
        enabled: display anything at all.
        start_step: step the run (re)starts from, so a resumed run shows the right fraction.
        print_every: steps between plain lines when ``stream`` is not a terminal; by default
            about 50 lines per run. The last step is always printed.
        stream: where to write; default ``sys.stdout``.
        display: ``(label, candidate metric names)`` pairs to show; default ``DISPLAY``.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        enabled: bool = True,
        start_step: int = 0,
        print_every: int | None = None,
        stream: TextIO | None = None,
        display: Sequence[tuple[str, Sequence[str]]] = DISPLAY,
    ) -> None:
        self.total_steps = int(total_steps)
        self.enabled = enabled
        self.print_every = print_every or max(1, self.total_steps // 50)
        self.display = display
        self._stream = stream if stream is not None else sys.stdout
        self._shown: dict[str, float] = {}
        self._shown_step: int | None = None  # the step the shown values were measured at
        self._start = self._last_time = time.monotonic()
        self._start_step = self._last_printed = int(start_step)
        self._tokens = 0.0  # since the last throughput measurement
        self._tok_per_s: float | None = None
        self._bar: Any = None
        self._task: Any = None
        if not enabled:
            return
        console = Console(file=self._stream)
        if console.is_terminal:
            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"), console=console,
            )
            self._task = self._bar.add_task("train", total=self.total_steps,
                                            completed=start_step, stats="")
            self._bar.start()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None, *,
               tokens: float | None = None) -> None:
        """Advance to ``step``. ``metrics`` (host scalars) refresh the shown values when given;
        ``tokens`` is the number of tokens processed since the previous call."""
        if not self.enabled:
            return
        step = int(step)
        if tokens is not None:
            self._tokens += float(tokens)
        now = time.monotonic()
        # Measure throughput over at least a second so per-step jitter does not flicker.
        if self._tokens and now - self._last_time >= 1.0:
            self._tok_per_s = self._tokens / (now - self._last_time)
            self._tokens, self._last_time = 0.0, now
        for label, names in self.display:
            for name in names:
                if metrics is not None and name in metrics:
                    self._shown[label] = float(np.asarray(metrics[name]))
                    self._shown_step = step
                    break
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=self._stats(step))
        elif step - self._last_printed >= self.print_every or step >= self.total_steps:
            # Distance, not step % n: callers may update only at their own logging interval.
            self._last_printed = step
            print(self.line(step), file=self._stream, flush=True)

    def _stats(self, step: int) -> str:
        parts = [f"{k} {v:.4g}" for k, v in self._shown.items()]
        if parts and self._shown_step is not None and self._shown_step != step:
            parts[-1] += f" @{self._shown_step}"
        if self._tok_per_s is not None:
            parts.append(f"{_si(self._tok_per_s)} tok/s")
        return " | ".join(parts)

    def line(self, step: int) -> str:
        """The plain-text status line of ``step``."""
        elapsed = time.monotonic() - self._start
        done = step - self._start_step
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = _duration((self.total_steps - step) / rate) if rate else "?"
        pct = 100.0 * step / max(self.total_steps, 1)
        head = f"step {step}/{self.total_steps} ({pct:.0f}%)"
        stats = self._stats(step)
        tail = f"{rate:.2f} step/s | elapsed {_duration(elapsed)} | eta {eta}"
        return " | ".join(p for p in (head, stats, tail) if p)

    def close(self) -> None:
        """Stop the bar (leaving it on screen). Idempotent."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
