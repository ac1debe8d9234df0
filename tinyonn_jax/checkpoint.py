"""Checkpoints of the whole training run; the only module that imports orbax.

A checkpoint of step ``s`` is one orbax step directory ``<directory>/<s>/`` holding three items:

* ``state``: the train-state pytree (parameters, optimizer states, step counter, rng key; any
  pytree of ``jax.Array`` including typed PRNG keys), written with ``StandardSave``;
* ``data``: the position in the data stream (a JSON dict, e.g. ``{"epoch": 1, "index": 37}``);
* ``config``: the experiment configuration (a JSON dict, e.g. ``Config.to_dict()``).

Atomicity: orbax writes a step into ``<s>.orbax-checkpoint-tmp*`` and renames it to ``<s>`` only
after every item and every process has finished (on filesystems without atomic rename, e.g. GCS,
a ``commit_success.txt`` marker plays that role). Listing steps ignores unfinished directories,
so a process killed mid-write leaves the last good checkpoint as ``latest_step()``; leftover
temporary directories are deleted the next time a writable ``Checkpointer`` opens the directory.
``tests/test_checkpoint.py`` checks this by SIGKILLing a writer.

Multi-host: every process must construct the ``Checkpointer`` with the same arguments and call
``save``/``restore`` together. Orbax coordinates them itself: each process writes the shards it
owns, the primary process writes metadata and finalizes the step, and barriers keep them in step.
The JSON items (data position, config) are written once, by the primary process. Hence
``enabled`` is *not* a per-process switch; ``enabled=False`` (on every process) turns the
object into a no-op for runs that do not checkpoint.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

_STATE, _DATA, _CONFIG = "state", "data", "config"


def _abstract_leaf(leaf: Any) -> jax.ShapeDtypeStruct:
    """Restore target of one template leaf, carrying the sharding it must come back with."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        # numpy leaves and sharding-less ShapeDtypeStructs: the default device is the only
        # placement that is right on a single host; multi-host templates must carry shardings.
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    arr = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype, sharding=sharding)


class Checkpointer:
    """Save and restore (train state, data position, config), keeping the last ``keep`` steps.

    Args:
        directory: root directory of the run's checkpoints (created if missing).
        keep: number of most recent checkpoints to keep; older ones are deleted after a newer
            one is finalized, so a crash never leaves fewer than before.
        enabled: ``False`` makes every method a no-op (``latest_step()`` is ``None``); must be
            the same on all processes (see the module docstring).
        read_only: open an existing directory without writing or cleaning it, e.g. from an
            evaluator running next to the trainer (cleaning would delete the trainer's
            in-progress temporary directory).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int = 3,
        enabled: bool = True,
        read_only: bool = False,
    ) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Checkpointer keep={keep!r}: must be a positive integer")
        self.directory = Path(directory).absolute()
        self.enabled = enabled
        self._manager: ocp.CheckpointManager | None = None
        self._closed = False
        # Finalized steps as of the start of an in-flight background save: orbax lists the
        # in-flight step (and drops the steps it will delete) as soon as the save starts.
        self._finalized_during_save: list[int] = []
        if not enabled:
            return
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            # Removes what a killed writer left behind; incomplete steps are ignored either way.
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
            enable_async_checkpointing=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _DATA, _CONFIG)
        )

    def save(
        self,
        step: int,
        state: Any,
        data_position: Mapping[str, Any],
        config: Mapping[str, Any],
        *,
        wait: bool = True,
    ) -> bool:
        """Write checkpoint ``step``; returns whether a checkpoint was started.

        With ``wait=False`` the call returns once the arrays are copied to host memory, so the
        caller may donate or overwrite ``state`` right away; the files are written in the
        background. A later ``save``, ``restore``, ``wait_until_finished`` or ``close`` waits for
        it. A step not greater than the latest saved one is skipped with a warning (a resumed
        run re-reaching a saved step), because orbax never overwrites a finalized step.
        """
        manager = self._live()
        if manager is None:
            return False
        latest = manager.latest_step()
        if latest is not None and step <= latest:
            log.warning("checkpoint step %d not saved: step %d already exists in %s", step,
                        latest, self.directory)
            return False
        manager.wait_until_finished()  # orbax would wait too; the snapshot must be current
        self._finalized_during_save = sorted(manager.all_steps())
        saved = manager.save(
            int(step),
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardSave(state),
                _DATA: ocp.args.JsonSave(dict(data_position)),
                _CONFIG: ocp.args.JsonSave(dict(config)),
            }),
        )
        if wait:
            manager.wait_until_finished()
        return bool(saved)

    def latest_step(self) -> int | None:
        """Latest *finalized* step, or ``None``; a checkpoint still being written is not one."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """All finalized steps, ascending (a background save in flight is not included)."""
        manager = self._live()
        if manager is None:
            return []
        if manager.is_saving_in_progress():
            return list(self._finalized_during_save)
        return sorted(manager.all_steps())

    def restore(
        self, state_template: Any, step: int | None = None
    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Return ``(state, data_position, config)`` of ``step`` (default: the latest).

        ``state_template`` is a pytree with the structure of the saved state whose leaves are
        arrays or ``jax.ShapeDtypeStruct``; every restored array gets the template leaf's shape,
        dtype and sharding, so a sharded template restores sharded (e.g. pass the freshly
        initialised, already sharded train state, or ``jax.eval_shape`` of its initialiser with
        shardings attached).
        """
        manager = self._live()
        if manager is None:
            raise RuntimeError(f"Checkpointer for {self.directory} is disabled; cannot restore")
        manager.wait_until_finished()
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no finalized checkpoint in {self.directory}")
        elif step not in manager.all_steps():
            raise FileNotFoundError(
                f"no finalized checkpoint for step {step} in {self.directory}; "
                f"available: {self.all_steps()}"
            )
        abstract = jax.tree.map(_abstract_leaf, state_template)
        restored = manager.restore(
            int(step),
            args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(abstract),
                _DATA: ocp.args.JsonRestore(),
                _CONFIG: ocp.args.JsonRestore(),
            }),
        )
        return restored[_STATE], dict(restored[_DATA]), dict(restored[_CONFIG])

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        """The config saved with ``step`` (default: the latest), without touching the state."""
        manager = self._live()
        if manager is None:
            raise RuntimeError(f"Checkpointer for {self.directory} is disabled; cannot restore")
        manager.wait_until_finished()
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(f"no finalized checkpoint for step {step} in "
                                    f"{self.directory}")
        restored = manager.restore(int(step),
                                   args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))
        return dict(restored[_CONFIG])

    def set_aside(self, step: int, destination: str | Path) -> Path:
        """Move the finalized step ``step`` out of the checkpoint directory into ``destination``
        (e.g. one that cannot be restored), so later saves may reuse its step number. Returns
        the new path; nothing is deleted. Every process calls it; process 0 moves the directory
        (and returns the path it chose) while the others wait for it."""
        manager = self._live()
        if manager is None:
            raise RuntimeError(f"Checkpointer for {self.directory} is disabled")
        manager.wait_until_finished()
        destination = Path(destination)
        target = destination / str(step)
        if jax.process_index() == 0:
            destination.mkdir(parents=True, exist_ok=True)
            n = 1
            while target.exists():
                target = destination / f"{step}.{n}"
                n += 1
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"tinyonn_set_aside_{step}")
        manager.reload()
        return target

    def wait_until_finished(self) -> None:
        """Block until a background save has been finalized (re-raises its error, if any)."""
        manager = self._live()
        if manager is not None:
            manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending writes and deletions and release orbax's threads. Idempotent."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None
        self._closed = True

    def _live(self) -> ocp.CheckpointManager | None:
        if self._closed:
            raise RuntimeError(f"Checkpointer for {self.directory} is closed")
        return self._manager

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
