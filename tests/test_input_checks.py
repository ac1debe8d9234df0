"""Host-side input checks (tinyonn_jax.validate) and their use by forward and generate."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from tinyonn_jax import validate
from tinyonn_jax.data.tokenizer import VOCAB_SIZE
from tinyonn_jax.eval.generate import generate
from tinyonn_jax.families.dyntrm import modules, recursion
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.nn import context

CFG = tiny_model_config()
_jit_forward = jax.jit(tr.forward, static_argnames="cfg")


@functools.cache
def _params(hidden: int = 16) -> dict:
    """Random parameters of the ``modules.init_params`` layout (numpy draws: nothing compiled)."""
    cfg = tiny_model_config(hidden=hidden)
    shapes = jax.eval_shape(lambda: modules.init_params(jax.random.key(0), cfg))
    rng = np.random.default_rng(hidden)
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def _tokens(b: int = 2, t: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB_SIZE, (b, t)).astype(np.int32)


@pytest.mark.parametrize("bad", [1000, -1])
def test_token_out_of_range_raises_naming_tokens(bad: int) -> None:
    tokens = _tokens()
    tokens[1, 4] = bad
    side = "max" if bad > 0 else "min"
    for run in (
        lambda: tr.forward(_params(), tokens, CFG),
        lambda: tr.forward(_params(), jnp.asarray(tokens), CFG),  # a concrete jax array
        lambda: tr.forward_adaptive(_params(), tokens, CFG),
        lambda: generate(_params(), tokens, np.array([6, 6]), CFG, max_new_tokens=2),
    ):
        with pytest.raises(ValueError, match=r"tokens has 1 token id") as info:
            run()
        msg = str(info.value)
        assert f"{side} {bad} at position (1, 4)" in msg and f"[0, {VOCAB_SIZE})" in msg


def test_vocab_smaller_than_tokenizer_raises() -> None:
    with pytest.raises(ValueError, match=r"model\.vocab_size=10") as info:
        validate.check_vocab(10, "configs/tiny.py")
    assert f"{VOCAB_SIZE} tokens" in str(info.value) and "configs/tiny.py" in str(info.value)
    validate.check_vocab(VOCAB_SIZE, "configs/tiny.py")
    validate.check_vocab(32, "configs/tiny.py")
    with pytest.raises(ValueError, match=r"model\.vocab_size=8"):
        validate.check_vocab(8, "config", field="model.vocab_size")
    # The batch check catches the same mistake from the data side: token 17 with vocab 10.
    with pytest.raises(ValueError, match=r"batch\['inputs'\].*\[0, 10\): max 17"):
        validate.check_batch(_batch(), 10)


def _batch() -> dict:
    tokens = _tokens(2, 8)
    tokens[0, 5] = VOCAB_SIZE - 1
    weights = np.zeros((2, 8), np.float32)
    weights[:, 4:] = 1.0
    return {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "weights": weights,
            "segment_ids": np.ones((2, 8), np.int32),
            "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))}


def test_check_batch() -> None:
    validate.check_batch(_batch(), VOCAB_SIZE)
    b = _batch()
    b["targets"][:, :3] = 999  # unweighted targets never reach the loss
    validate.check_batch(b, VOCAB_SIZE)
    b["targets"][1, 6] = 999
    with pytest.raises(ValueError, match=r"max 999 at position \(1, 6\)"):
        validate.check_batch(b, VOCAB_SIZE)
    cases = {
        "inputs": (lambda b: b["inputs"].astype(np.float32), "integer dtype"),
        "positions": (lambda b: b["positions"][:, :4], "shape"),
        "weights": (lambda b: np.where(b["weights"] > 0, np.nan, 0.0), "finite"),
    }
    for key, (change, words) in cases.items():
        b = _batch()
        b[key] = change(b)
        with pytest.raises(ValueError, match=rf"batch\['{key}'\].*{words}"):
            validate.check_batch(b, VOCAB_SIZE)
    with pytest.raises(ValueError, match="lacks"):
        validate.check_batch({k: v for k, v in _batch().items() if k != "weights"}, VOCAB_SIZE)


BAD_FORWARD = {
    "float_tokens": (lambda t: (t.astype(np.float32), {}), r"tokens must have an integer dtype"),
    "rank1_tokens": (lambda t: (t[0], {}), r"tokens must have shape \(B, T\) \(rank 2\)"),
    "empty_sequence": (lambda t: (t[:, :0], {}), r"tokens must have shape \(B, T\) with .*T >= 1"),
    "positions_shape": (lambda t: (t, {"positions": t[:, :3]}), r"positions must have the shape"),
    "segment_ids_float": (lambda t: (t, {"segment_ids": t.astype(np.float32)}),
                          r"segment_ids must have an integer dtype"),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", sorted(BAD_FORWARD))
def test_bad_forward_inputs_name_the_argument(name: str, jit: bool) -> None:
    change, pattern = BAD_FORWARD[name]
    tokens, kw = change(_tokens())
    fwd = _jit_forward if jit else tr.forward
    with pytest.raises(ValueError, match=pattern):
        fwd(_params(), jnp.asarray(tokens), cfg=CFG, **kw)
    with pytest.raises(ValueError, match=pattern):
        tr.forward_adaptive(_params(), tokens, CFG, **kw)


@pytest.mark.parametrize("jit", [False, True])
def test_params_of_another_config_raise(jit: bool) -> None:
    fwd = _jit_forward if jit else tr.forward
    with pytest.raises(ValueError, match="params do not match the model of cfg") as info:
        fwd(_params(hidden=32), _tokens(), cfg=CFG)
    # the first mismatching leaf (tree order), its shape and the expected shape
    assert "params['block']['attn']['proto_attn'] has shape (4, 32), expected (4, 16)" \
        in str(info.value)
    missing = dict(_params())
    del missing["halt"]
    with pytest.raises(ValueError, match=r"params lacks \['halt'\]"):
        fwd(missing, _tokens(), cfg=CFG)
    with pytest.raises(ValueError, match="params do not match"):
        generate(_params(hidden=32), _tokens(), np.array([6, 6]), CFG, max_new_tokens=2)


@pytest.mark.parametrize(
    "lengths,pattern",
    [
        (np.array([6, 0]), r"lengths\[1\] = 0 is outside \[1, 6\]"),
        (np.array([7, 6]), r"lengths\[0\] = 7 is outside \[1, 6\]"),
        (np.array([6.0, 6.0]), r"lengths must have an integer dtype"),
        (np.array([6]), r"lengths must have shape \(B,\)"),
    ],
)
def test_generate_checks_lengths(lengths: np.ndarray, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        generate(_params(), jnp.asarray(_tokens()), jnp.asarray(lengths), CFG, max_new_tokens=2)


def test_forward_under_jit_is_unchanged() -> None:
    """The checks add nothing to the traced computation: same jaxpr, identical logits."""
    params, tokens = _params(), jnp.asarray(_tokens())

    def unchecked(p, t):  # forward's body without the checks
        ctx = context.make_context(t)
        _, steps = recursion.refine(p, tr.embed(p, t, CFG), ctx, CFG, None,
                                    tr.make_readout(CFG))
        return steps.logits[-1]

    def checked(p, t):
        return tr.forward(p, t, CFG)[0]

    assert str(jax.make_jaxpr(checked)(params, tokens)) == \
        str(jax.make_jaxpr(unchecked)(params, tokens))
    logits = jax.jit(checked)(params, tokens)
    np.testing.assert_array_equal(logits, jax.jit(unchecked)(params, tokens))
    before = modules.param_layout.cache_info().hits
    validate.check_forward_inputs(params, tokens, CFG, modules.param_layout(CFG))
    assert modules.param_layout.cache_info().hits > before  # expected shapes are cached
