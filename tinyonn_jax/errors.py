"""Errors a user can fix, as opposed to bugs.

``UserError`` is what the command-line programs print as one line ``<prog>: <message>`` with exit
code 2 (a traceback only with ``--debug``); everything else is a bug and keeps its traceback.
``ConfigError`` (a bad config value) and ``Interrupted`` (a signal asked the run to stop) are the
two specialisations the training program raises.
"""

from __future__ import annotations

import errno
import signal

# OS errors that come from the user's environment (permissions, space, paths), not from a bug.
USER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                         errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                         errno.ENAMETOOLONG})


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


def user_error_message(e: BaseException) -> str | None:
    """The one-line message of a user error (``UserError``, or an ``OSError`` of the user's
    environment), or None when ``e`` is a bug."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.errno in USER_ERRNOS:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or e}{where}"
    return None
