"""The run directory: exclusive use, writability, and logs that match the restored step.

* ``WorkdirLock`` holds an advisory ``flock`` on ``<workdir>/.lock`` for the life of a run; a
  second run on the same directory is refused with the holder's PID. The kernel drops the lock
  when the process ends, however it ends (SIGKILL included), so a stale lock file never blocks.
* ``check_writable`` fails early, with the path, where the run could not write logs or
  checkpoints (a read-only directory, a file in the way, a full disk).
* ``rewind_jsonl`` drops the records of steps after the step a run restarts from, so a step
  logged by a killed run after its last checkpoint appears once, not twice.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path

from tinyonn_jax.errors import UserError

LOCK_NAME = ".lock"


def check_writable(workdir: Path) -> None:
    """Create ``workdir`` if needed and write a probe file in it; ``UserError`` naming the path."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe.{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the workdir: {e.strerror or e} ({workdir})") from None


class WorkdirLock:
    """Exclusive advisory lock on ``<workdir>/.lock``, recording the holder's PID."""

    def __init__(self, workdir: Path) -> None:
        self.path = Path(workdir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        import fcntl  # POSIX; imported here so the module imports everywhere

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"the workdir is in use by another run (PID {holder}); wait for "
                                f"it to finish or choose another --workdir ({self.path})") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock; idempotent. The lock file stays (its content is only informative)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def rewind_jsonl(path: Path, step: int) -> int:
    """Keep only the records of ``path`` with ``"step" <= step``; returns how many were dropped.

    The file is rewritten atomically (temporary file and rename); lines that are not JSON
    objects with an integer ``step`` (e.g. a line cut short by a kill) are dropped too.
    """
    if not path.exists():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and int(rec["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_atomic(path, "".join(f"{k}\n" for k in kept))
    return dropped


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path``, flush it to disk, then rename it over
    ``path``: readers see the old file or the new one, never a part. The file gets the mode a
    plain new file would get (``0o666`` less the umask); the temporary file never stays behind.
    """
    umask = os.umask(0)
    os.umask(umask)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
