"""2D grid positions (``rope="rope2d"``): every cell's coordinates are its (row, column) in the grid
as augmented, packed or not; the decoding cursor agrees with the batch computation; every family
accepts the mode and keeps packed sequences independent."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_FAMILY_CONFIGS, tiny_model_config

from tinyonn_jax.data import augment
from tinyonn_jax.data.batching import build_batch
from tinyonn_jax.data.tasks import load_tasks
from tinyonn_jax.data.tokenizer import (
    COLOR_OFFSET,
    IM_START,
    NEWLINE,
    VOCAB_SIZE,
    serialize_task,
)
from tinyonn_jax.errors import ConfigError
from tinyonn_jax.families.registry import get_family
from tinyonn_jax.nn import attention
from tinyonn_jax.nn.positions import GridCursor, grid_coordinates


def _tasks(n=3):
    """Small real tasks with non-square grids (so row/column mix-ups show)."""
    out = []
    for t in load_tasks("arc1", "train"):
        grids = t.grids()
        if any(g.shape[0] != g.shape[1] for g in grids) and sum(g.size for g in grids) < 400:
            out.append(t)
        if len(out) == n:
            return out
    raise AssertionError("no small non-square tasks found")


def _expected_cells(task) -> list[tuple[int, int, int, int]]:
    """(grid index, row, column, colour) of every cell in serialisation order, from the grids."""
    grids = [g for inp, out in (*task.train, task.test[0]) for g in (inp, out)]
    return [(k + 1, r, c, int(g[r, c])) for k, g in enumerate(grids)
            for r in range(g.shape[0]) for c in range(g.shape[1])]


@pytest.mark.parametrize("transform", range(augment.NUM_TRANSFORMS))
def test_every_cell_gets_its_row_and_column_in_the_augmented_grid(transform):
    rng = np.random.default_rng(transform)
    views = []
    for task in _tasks():
        view = augment.View(transform=transform,
                            color_perm=augment.random_color_perm(rng, keep_zero=False))
        views.append(view.apply(task))
    seqs = [serialize_task(t, 0) for t in views]
    # Two rows: the first packs two sequences, the second holds the third after padding.
    length = max(seqs[0][0].size + seqs[1][0].size, seqs[2][0].size) + 3
    batches = [build_batch([[seqs[0], seqs[1]], [seqs[2]]], length)]
    packed = 0
    seen = set()
    for b in batches:
        coords = np.asarray(grid_coordinates(jnp.asarray(b["inputs"]),
                                             jnp.asarray(b["segment_ids"])))
        for r in range(b["inputs"].shape[0]):
            segs = b["segment_ids"][r]
            ids = [s for s in np.unique(segs) if s > 0]
            packed += len(ids) > 1
            for s in ids:
                sel = np.flatnonzero(segs == s)
                toks = b["inputs"][r, sel]
                match = [i for i, sq in enumerate(seqs)
                         if sq[0].size == sel.size and np.array_equal(sq[0], toks)]
                assert match, "a packed segment is one whole sequence"
                seen.add(match[0])
                cells = (toks >= COLOR_OFFSET) & (toks < VOCAB_SIZE)
                got = [(*map(int, coords[r, sel[i]]), int(toks[i]) - COLOR_OFFSET)
                       for i in np.flatnonzero(cells)]
                assert got == _expected_cells(views[match[0]])
                # Separators sit in the column after the row's last cell; <im_start> at (k, 0, 0).
                for i in np.flatnonzero(toks == NEWLINE):
                    g, row, col = coords[r, sel[i]]
                    assert col == coords[r, sel[i - 1]][2] + 1 and row == coords[r, sel[i - 1]][1]
                ims = np.flatnonzero(toks == IM_START)
                np.testing.assert_array_equal(coords[r, sel[ims]],
                                              [[k + 1, 0, 0] for k in range(ims.size)])
    assert seen == set(range(len(seqs)))
    assert packed >= 1  # at least one row holds two sequences


def test_coordinates_follow_the_transform_of_the_grid():
    """A cell's coordinates in the transformed grid are where D8 moves it: a transpose swaps
    (row, column) of every cell of every grid."""
    task = _tasks(1)[0]
    plain, swapped = (serialize_task(augment.View(transform=k).apply(task), 0)[0]
                      for k in (0, augment.TRANSFORM_NAMES.index("transpose")))
    c0 = np.asarray(grid_coordinates(jnp.asarray(plain[None]), jnp.ones((1, plain.size), int)))[0]
    c1 = np.asarray(grid_coordinates(jnp.asarray(swapped[None]),
                                     jnp.ones((1, swapped.size), int)))[0]
    cell0 = c0[(plain >= COLOR_OFFSET)]
    cell1 = c1[(swapped >= COLOR_OFFSET)]
    # Same multiset of (grid, row, col) after swapping row and column.
    a = sorted(map(tuple, cell0.tolist()))
    b = sorted((g, c, r) for g, r, c in cell1.tolist())
    assert a == b


def test_cursor_equals_the_batch_computation_token_by_token():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB_SIZE, size=(3, 200)).astype(np.int32)
    tokens[:, ::7] = NEWLINE
    tokens[:, ::23] = IM_START
    seg = np.ones_like(tokens)
    full = np.asarray(grid_coordinates(jnp.asarray(tokens), jnp.asarray(seg)))
    cursor = GridCursor(*(jnp.zeros(3, jnp.int32) for _ in range(3)))
    for t in range(tokens.shape[1]):  # test-side loop: the decoder's one-token path
        coords, cursor = cursor.step(jnp.asarray(tokens[:, t]))
        np.testing.assert_array_equal(coords, full[:, t])
        # Restarting from any token's coordinates continues identically.
        np.testing.assert_array_equal(
            GridCursor.after(jnp.asarray(tokens[:, t]), jnp.asarray(full[:, t])), cursor)


def test_segments_and_left_padding_restart_the_counts():
    seq = serialize_task(_tasks(1)[0], 0)[0]
    alone = np.asarray(grid_coordinates(jnp.asarray(seq[None]), jnp.ones((1, seq.size), int)))
    pad = 5
    toks = np.concatenate([np.full(pad, IM_START, np.int32), seq])  # junk in the padding segment
    seg = np.concatenate([np.zeros(pad, np.int32), np.ones(seq.size, np.int32)])
    shifted = np.asarray(grid_coordinates(jnp.asarray(toks[None]), jnp.asarray(seg[None])))
    np.testing.assert_array_equal(shifted[0, pad:], alone[0])


def test_multi_axis_rope_is_a_rotation_by_coordinate_differences():
    """q.k after rotation depends only on the coordinate differences (relative positions)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    q = jax.random.normal(k1, (1, 1, 1, 16))
    k = jax.random.normal(k2, (1, 1, 1, 16))
    a, b = jnp.array([[[2, 5, 3]]]), jnp.array([[[1, 1, 7]]])
    shift = jnp.array([[[4, 9, 11]]])
    dot = lambda p, r: float(jnp.sum(attention.rope(q, p, 3.0) * attention.rope(k, r, 3.0)))  # noqa: E731
    np.testing.assert_allclose(dot(a, b), dot(a + shift, b + shift), rtol=1e-5)
    assert abs(dot(a, b) - dot(a, a)) > 1e-3  # and it does depend on them
    assert attention.axis_pairs(8, 3) == (2, 3, 3)
    assert sum(attention.axis_pairs(32, 3)) == 32


@pytest.mark.parametrize("family", sorted(TINY_FAMILY_CONFIGS))
def test_every_family_runs_rope2d_and_packing_keeps_sequences_apart(family):
    cfg = TINY_FAMILY_CONFIGS[family]
    wide = {"dynonn": {"head_dim": 8}}.get(family, {})  # three rotation pairs at least
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rope="rope2d", **wide))
    fam = get_family(cfg)
    params, extras = fam.init(jax.random.key(0), cfg)
    tasks = _tasks(2)
    a, b = (serialize_task(t, 0)[0][:60] for t in tasks)
    both = np.concatenate([a, b])[None]
    seg = np.concatenate([np.ones(a.size, np.int32), np.full(b.size, 2, np.int32)])[None]
    pos = np.concatenate([np.arange(a.size), np.arange(b.size)])[None].astype(np.int32)
    packed = fam.logits(params, extras, jnp.asarray(both), cfg, positions=jnp.asarray(pos),
                        segment_ids=jnp.asarray(seg))
    alone = fam.logits(params, extras, jnp.asarray(b[None]), cfg)
    np.testing.assert_allclose(packed[0, a.size:], alone[0], rtol=2e-4, atol=2e-4)
    one_d = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rope="rope1d"))
    other = fam.logits(params, extras, jnp.asarray(b[None]), one_d)
    assert float(jnp.max(jnp.abs(other - alone))) > 1e-4  # the mode changes the model


@pytest.mark.parametrize("family", sorted(TINY_FAMILY_CONFIGS))
def test_rope2d_needs_three_rotation_pairs(family):
    cfg = TINY_FAMILY_CONFIGS[family].model
    width = {"dyntrm": dict(hidden=8, num_heads=2), "spl": dict(hidden=4),
             "dynonn": dict(head_dim=4)}[family]
    with pytest.raises(ConfigError, match="rope2d|rope"):
        dataclasses.replace(cfg, rope="rope2d", **width)


def test_dyntrm_dense_twin_keeps_rope2d():
    from tinyonn_jax.families.dyntrm import dense
    m = tiny_model_config(rope="rope2d")
    twin = dense.match_param_count(m)
    assert twin.rope == "rope2d" and twin.head_dim >= 6
