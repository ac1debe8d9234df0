"""Graceful stop on SIGINT / SIGTERM for a host training loop.

The first signal only sets ``requested``: the loop finishes its step, saves a checkpoint and
stops (the program then exits with 128 + the signal number: 130 for SIGINT, 143 for SIGTERM). A
second signal exits the process at once with the same code, without saving. Handlers are
installed only in the main thread (elsewhere ``GracefulStop`` does nothing) and the previous
handlers come back on exit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager turning the first SIGINT/SIGTERM into ``requested`` (the signal number)."""

    def __init__(self, prog: str = "tinyonn-train") -> None:
        self.prog = prog
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            print(f"\n{self.prog}: second {name}: exiting now without saving", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.requested = signum
        print(f"\n{self.prog}: {name}: saving a checkpoint after this step, then exiting "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
