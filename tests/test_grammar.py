"""Stopping a hopeless answer never changes a score: whatever follows, it decodes to None; a legal
grid is never hopeless; evaluation generates the same predictions with and without the stop."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tinyonn_jax.data.tasks import load_tasks
from tinyonn_jax.data.tokenizer import (
    COLOR_OFFSET,
    EOS,
    IM_END,
    NEWLINE,
    VOCAB_SIZE,
    decode_generation,
    grid_to_tokens,
)
from tinyonn_jax.eval.grammar import AnswerState


def _flags(seq: np.ndarray) -> np.ndarray:
    """Hopeless flag after each token of one answer (test-side loop over tokens)."""
    state, out = AnswerState.start(1), []
    for tok in seq:
        state, h = state.advance(jnp.asarray([tok], jnp.int32))
        out.append(bool(h[0]))
    return np.array(out)


def test_a_legal_grid_is_never_hopeless():
    grids = [g for t in load_tasks("arc1", "train")[:60] for g in t.grids()]
    grids.append(np.full((30, 30), 3, np.int8))
    for g in grids:
        seq = np.concatenate([grid_to_tokens(g), [IM_END]])
        assert not _flags(seq).any(), g.shape
        assert decode_generation(seq).ok


@pytest.mark.parametrize("seed", range(4))
def test_after_a_hopeless_token_every_continuation_is_malformed(seed):
    rng = np.random.default_rng(seed)
    cells = np.arange(COLOR_OFFSET, VOCAB_SIZE)
    n_hopeless = 0
    for _ in range(150):
        # Mostly grid-like answers (rows of 2-4 cells) with occasional slips.
        w = int(rng.integers(2, 5))
        seq = []
        for _ in range(int(rng.integers(1, 6))):
            seq += list(rng.choice(cells, size=w + int(rng.integers(-1, 2) * (rng.random() < .2))))
            seq.append(NEWLINE)
        seq = seq[:-1]
        if rng.random() < 0.3:
            seq.insert(int(rng.integers(0, len(seq) + 1)), int(rng.integers(0, VOCAB_SIZE)))
        stops = [i for i, t in enumerate(seq) if t in (IM_END, EOS)]
        seq = seq[:stops[0]] if stops else seq  # a decoder stops at the first stop token
        flags = _flags(np.array(seq + [IM_END], np.int32))
        if flags.any():
            n_hopeless += 1
            first = int(np.argmax(flags))
            for _ in range(5):  # any continuation, stopped or not
                tail = list(rng.choice(np.r_[cells, NEWLINE], size=int(rng.integers(0, 40))))
                full = np.array(seq[:first + 1] + tail + [IM_END], np.int32)
                assert not decode_generation(full).ok
        else:  # never flagged: the answer as written decodes iff it is well formed
            assert decode_generation(np.array(seq + [IM_END])).ok == (
                len({len(r) for r in _rows(seq)}) == 1 and all(_rows(seq)))
    assert n_hopeless > 20


def _rows(seq):
    rows, cur = [], []
    for t in seq:
        if t == NEWLINE:
            rows.append(cur)
            cur = []
        else:
            cur.append(t)
    rows.append(cur)
    return rows


def test_thirty_one_rows_or_columns_are_hopeless():
    row31 = np.full(31, COLOR_OFFSET, np.int32)
    assert _flags(row31)[-1] and not _flags(row31)[:-1].any()
    tall = np.concatenate([grid_to_tokens(np.zeros((30, 1), np.int8)), [NEWLINE]])
    assert _flags(tall)[-1] and not _flags(tall)[:-1].any()
    assert not _flags(np.array([COLOR_OFFSET, EOS]))[-1]


def test_generation_with_the_stop_is_a_prefix_with_the_same_prediction():
    import jax
    from conftest import tiny_model_config

    from tinyonn_jax.data.augment import View
    from tinyonn_jax.eval.evaluate import _prediction
    from tinyonn_jax.eval.generate import generate, left_pad
    from tinyonn_jax.families.dyntrm import modules

    cfg = tiny_model_config(rope="rope2d")
    params = modules.init_params(jax.random.key(1), cfg)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, VOCAB_SIZE, size=n).astype(np.int32) for n in (9, 5, 12, 7)]
    tokens, lengths = left_pad(prompts)
    full, cut = (generate(params, jnp.asarray(tokens), jnp.asarray(lengths), cfg,
                          max_new_tokens=48, stop_hopeless=s) for s in (False, True))
    shorter = 0
    for r in range(len(prompts)):
        n_full, n_cut = int(full.num_generated[r]), int(cut.num_generated[r])
        assert n_cut <= n_full
        shorter += n_cut < n_full
        np.testing.assert_array_equal(np.asarray(cut.tokens[r, :n_cut]),
                                      np.asarray(full.tokens[r, :n_cut]))
        a = _prediction(np.asarray(full.tokens[r]), n_full, 0.0, View())[0]
        b = _prediction(np.asarray(cut.tokens[r]), n_cut, 0.0, View())[0]
        assert (a is None and b is None) or np.array_equal(a, b)
    assert shorter >= 1  # an untrained model babbles: the stop does cut something
