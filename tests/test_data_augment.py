"""Augmentation: D8 and colour permutations are invertible on every real task; determinism."""

from __future__ import annotations

import numpy as np
import pytest

from tinyonn_jax.data.augment import (
    IDENTITY_PERM,
    INVERSE,
    NUM_TRANSFORMS,
    SWAPS_AXES,
    View,
    apply_transform,
    invert_perm,
    invert_transform,
    random_color_perm,
    sample_views,
)
from tinyonn_jax.data.tasks import Task, load_tasks

SETS = [("arc1", "train"), ("arc1", "eval"), ("arc2", "train"), ("arc2", "eval")]
G = np.arange(6).reshape(2, 3)  # [[0 1 2] [3 4 5]], not square so axis swaps are visible


def test_transforms_match_their_definitions() -> None:
    h, w = G.shape
    expected = [
        G,
        np.array([[2, 5], [1, 4], [0, 3]]),  # rot90 counter-clockwise
        np.array([[5, 4, 3], [2, 1, 0]]),
        np.array([[3, 0], [4, 1], [5, 2]]),
        np.array([[3, 4, 5], [0, 1, 2]]),  # flip vertical: rows reversed
        np.array([[2, 1, 0], [5, 4, 3]]),  # flip horizontal: columns reversed
        G.T,
        np.array([[G[h - 1 - j, w - 1 - i] for j in range(h)] for i in range(w)]),
    ]
    for k in range(NUM_TRANSFORMS):
        out = apply_transform(G, k)
        np.testing.assert_array_equal(out, expected[k])
        assert (out.shape != G.shape) == SWAPS_AXES[k]


def test_transforms_form_the_dihedral_group() -> None:
    g = np.random.default_rng(0).integers(0, 10, (5, 5))
    images = {apply_transform(g, k).tobytes() for k in range(NUM_TRANSFORMS)}
    assert len(images) == 8  # all distinct on a generic square grid
    for k in range(NUM_TRANSFORMS):
        np.testing.assert_array_equal(apply_transform(apply_transform(g, k), INVERSE[k]), g)
        for m in range(NUM_TRANSFORMS):  # closed under composition
            assert apply_transform(apply_transform(g, k), m).tobytes() in images


@pytest.mark.parametrize("source,split", SETS)
def test_every_view_inverts_on_every_real_task(source: str, split: str) -> None:
    rng = np.random.default_rng(0)
    perm = random_color_perm(rng)
    for task in load_tasks(source, split):
        grids = task.grids()
        for k in range(NUM_TRANSFORMS):
            view = View(k, perm)
            for g in grids:
                np.testing.assert_array_equal(view.invert_grid(view.apply_grid(g)), g)


@pytest.mark.parametrize("source,split", SETS[:2])
def test_applied_task_maps_back(source: str, split: str) -> None:
    rng = np.random.default_rng(1)
    for task in load_tasks(source, split):
        (view,) = sample_views(task, 1, rng, keep_zero=False)
        aug = view.apply(task)
        assert aug.task_id == task.task_id and len(aug.train) == len(task.train)
        for i, j in enumerate(view.pair_order):
            for a, b in zip(aug.train[i], task.train[j], strict=True):
                np.testing.assert_array_equal(view.invert_grid(a), b)
        for a_pair, pair in zip(aug.test, task.test, strict=True):
            for a, b in zip(a_pair, pair, strict=True):
                np.testing.assert_array_equal(view.invert_grid(a), b)


def test_colour_permutations() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        keep = random_color_perm(rng)
        assert keep[0] == 0 and sorted(keep) == list(range(10))
        free = random_color_perm(rng, keep_zero=False)
        assert sorted(free) == list(range(10))
        assert tuple(np.asarray(free)[list(invert_perm(free))]) == IDENTITY_PERM
    assert any(random_color_perm(rng, keep_zero=False)[0] != 0 for _ in range(50))
    view = View(0, (0, 2, 1, 3, 4, 5, 6, 7, 8, 9))
    np.testing.assert_array_equal(view.apply_grid(np.array([[0, 1, 2]])), [[0, 2, 1]])


def test_views_are_deterministic_and_distinct() -> None:
    task = load_tasks("arc1", max_tasks=1)[0]
    a = sample_views(task, 4, np.random.default_rng(7))
    b = sample_views(task, 4, np.random.default_rng(7))
    c = sample_views(task, 4, np.random.default_rng(8))
    assert a == b and a != c
    assert len({v.transform for v in a}) == 4
    full = sample_views(task, 8, np.random.default_rng(0), include_identity=True)
    assert full[0].is_identity and sorted(v.transform for v in full) == list(range(8))
    many = sample_views(task, 20, np.random.default_rng(0))
    assert sorted(v.transform for v in many[:16]) == sorted(list(range(8)) * 2)
    plain = sample_views(
        task, 3, np.random.default_rng(0), permute_colors=False, shuffle_pairs=False
    )
    assert all(v.color_perm == IDENTITY_PERM and v.pair_order is None for v in plain)


def test_view_validation_and_hidden_outputs() -> None:
    with pytest.raises(ValueError, match="transform"):
        View(8)
    with pytest.raises(ValueError, match="color_perm"):
        View(0, (0,) * 10)
    g = np.zeros((2, 3), np.int8)
    task = Task("t", train=((g, g), (g, g)), test=((g, None),))
    with pytest.raises(ValueError, match="pair_order"):
        View(1, IDENTITY_PERM, (0, 0)).apply(task)
    aug = View(1).apply(task)
    assert aug.test[0][1] is None and aug.test[0][0].shape == (3, 2)
    assert not aug.train[0][0].flags.writeable
    assert View(6).to_dict()["transform"] == "transpose"


def test_invert_transform_is_inverse() -> None:
    for k in range(NUM_TRANSFORMS):
        np.testing.assert_array_equal(invert_transform(apply_transform(G, k), k), G)
