"""A ``jax.profiler`` trace of a range of training steps (``tinyonn-train --profile START:STOP``).

Steps are numbered as in the logs: step n is the n-th update (1 = the first). The trace covers
steps START to STOP, both included, and is written to ``<workdir>/profile/`` in the layout
TensorBoard's profile plugin and XProf read (``plugins/profile/<run>/<host>.xplane.pb`` and a
``.trace.json.gz`` that Perfetto opens); writing it needs no package beyond jax. The first step
of a run includes its compilation. The trace stops after STOP, or when the run ends or is
interrupted earlier (``close``).
"""

from __future__ import annotations

from pathlib import Path

import jax

from tinyonn_jax.errors import UserError

PROFILE_DIR = "profile"


def parse_step_range(text: str, flag: str = "--profile") -> tuple[int, int]:
    """``"START:STOP"`` -> (START, STOP) with 1 <= START <= STOP; ``UserError`` naming ``flag``."""
    start, sep, stop = str(text).partition(":")
    try:
        first, last = int(start), int(stop)
    except ValueError:
        first = last = 0
    if not sep or first < 1 or last < first:
        raise UserError(f"expected START:STOP, two step numbers with 1 <= START <= STOP, got "
                        f"{text!r} ({flag})")
    return first, last


class StepProfiler:
    """Starts a trace before step ``steps[0]`` and stops it after step ``steps[1]`` (1-based);
    ``steps=None`` traces nothing.

    The loop calls ``before_step(n)`` before the n-th update, ``after_step(n, outputs)`` after
    it (the outputs are waited for before the trace stops, so their device work is in it) and
    ``close()`` when it ends for any reason. A run resumed inside the range traces its
    remaining steps. ``enabled=False`` (processes other than 0) does nothing.
    """

    def __init__(self, workdir: str | Path, steps: tuple[int, int] | None, *,
                 enabled: bool = True):
        self.directory = Path(workdir) / PROFILE_DIR
        self.start, self.stop = steps or (0, -1)
        self.enabled = enabled and steps is not None
        self.active = False

    def before_step(self, step: int) -> None:
        if self.enabled and not self.active and self.start <= step <= self.stop:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after_step(self, step: int, outputs=None) -> None:
        if self.active and step >= self.stop:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
