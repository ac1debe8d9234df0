"""Curriculum: easy-first ordering by (largest grid area, mean output entropy) and warm-up."""

from __future__ import annotations

import numpy as np
import pytest

from tinyonn_jax.data.curriculum import (
    curriculum_stages,
    grid_entropy_bits,
    order_by_difficulty,
    task_difficulty,
    warmup_count,
)
from tinyonn_jax.data.tasks import Task, load_tasks


def test_entropy_bits() -> None:
    assert grid_entropy_bits(np.zeros((3, 3), np.int8)) == 0.0
    assert grid_entropy_bits(np.array([[0, 1]])) == pytest.approx(1.0)
    assert grid_entropy_bits(np.arange(4).reshape(2, 2)) == pytest.approx(2.0)


def test_difficulty_of_a_hand_made_task() -> None:
    a = np.zeros((2, 2), np.int8)
    b = np.array([[0, 1, 2, 3]], np.int8)  # 2 bits
    task = Task("t", train=((a, a),), test=((np.zeros((3, 5), np.int8), b),))
    assert task_difficulty(task) == (15, pytest.approx(1.0))  # mean of 0 and 2 bits


def test_order_is_ascending_and_warmup_is_its_prefix() -> None:
    tasks = load_tasks("arc1", "train")
    ordered = order_by_difficulty(tasks)
    keys = [task_difficulty(t) for t in ordered]
    assert keys == sorted(keys) and len(ordered) == len(tasks)
    stage1, stage2 = curriculum_stages(tasks, 0.1)
    assert len(stage1) == 40 and stage1 == stage2[:40] and stage2 == ordered


def test_warmup_count() -> None:
    assert warmup_count(400, 0.1) == 40 and warmup_count(7, 0.1) == 1
    assert warmup_count(10, 0.0) == 1 and warmup_count(10, 1.0) == 10 and warmup_count(0, 0.5) == 0
    with pytest.raises(ValueError, match="fraction"):
        warmup_count(10, 1.5)
