"""Easy-first curriculum: order tasks by size and output entropy, and a warm-up stage.

As in the original pipeline, difficulty is the pair (largest grid area in the task, mean Shannon
entropy in bits of the colour histogram of the output grids), compared lexicographically: small
tasks come first and, among equally large ones, those with simpler outputs. Stage 1 is the first
``warmup`` fraction of the ordered tasks; stage 2 is all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from tinyonn_jax.data.tasks import NUM_COLORS, Task


def grid_entropy_bits(grid: np.ndarray) -> float:
    """Shannon entropy (bits) of the colour distribution of one grid; 0 for a uniform grid."""
    counts = np.bincount(np.asarray(grid, dtype=np.int64).reshape(-1), minlength=NUM_COLORS)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def task_difficulty(task: Task) -> tuple[int, float]:
    """``(largest grid area, mean output entropy in bits)`` of a task.

    The area covers every grid present (inputs and known outputs); the entropy averages the
    train outputs and the known test outputs, so a task with hidden answers is still ranked.
    """
    area = max(g.shape[0] * g.shape[1] for g in task.grids())
    outs = [o for _, o in (*task.train, *task.test) if o is not None]
    return area, float(np.mean([grid_entropy_bits(o) for o in outs]))


def order_by_difficulty(tasks: Sequence[Task]) -> list[Task]:
    """Tasks sorted ascending by ``task_difficulty``; ties broken by task id (deterministic)."""
    return sorted(tasks, key=lambda t: (*task_difficulty(t), t.task_id))


def warmup_count(n_tasks: int, fraction: float) -> int:
    """How many tasks form the warm-up stage: ``ceil(fraction * n)``, at least 1 if n > 0."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"warm-up fraction must be in [0, 1], got {fraction}")
    if n_tasks == 0:
        return 0
    return min(n_tasks, max(1, math.ceil(fraction * n_tasks)))


def curriculum_stages(tasks: Sequence[Task], warmup: float) -> tuple[list[Task], list[Task]]:
    """``(stage1, stage2)``: the easiest ``warmup`` fraction of tasks, then all tasks, both ordered.

    A ``warmup`` of 0 still yields a one-task stage 1 so the first stage is never empty; callers
    that want no warm-up should start directly with stage 2.
    """
    ordered = order_by_difficulty(tasks)
    return ordered[: warmup_count(len(ordered), warmup)], ordered
