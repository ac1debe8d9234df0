"""Errors a user can fix, as opposed to bugs.

``UserError`` is what the command-line programs print as one line ``<prog>: <message>`` with exit
code 2 (a traceback only with ``--debug``); everything else is a bug and keeps its traceback.
``ConfigError`` (a bad config value) and ``Interrupted`` (a signal asked the run to stop) are the
two specialisations the training program raises.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """A problem with the user's input: config, files, flags, workdir. Exit code 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the field."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped a run after it saved its state; exit code 128 + signal number."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name
