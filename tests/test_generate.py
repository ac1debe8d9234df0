"""KV-cache generation equals full-recompute greedy decoding; stopping and padding rules."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from tinyonn_jax.config import Config
from tinyonn_jax.data.tokenizer import EOS, IM_END, PAD
from tinyonn_jax.eval.generate import generate, left_pad
from tinyonn_jax.eval.recompute import FamilyLogits, generate_by_recompute
from tinyonn_jax.families.dyntrm import halting, modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.family import DYNTRM

NEW = 20
REF_LEN = 40  # fixed shape of the reference forward: one compile per config
BIAS_DIM = 0  # hidden unit turned into a constant 1 feature, so lm_head row 0 acts as a bias


def _model(cfg, seed=0, stop_boost=-1e3):
    """Random params whose final LN emits h[BIAS_DIM] = 1, with ``stop_boost`` on eos and ime.

    The default suppresses both stop tokens so that ~20 tokens get compared.
    """
    params = modules.init_params(jax.random.key(seed), cfg)
    ln = params["final_ln"]
    ln["scale"] = ln["scale"].at[BIAS_DIM].set(0.0)
    ln["bias"] = ln["bias"].at[BIAS_DIM].set(1.0)
    head = params["lm_head"].at[BIAS_DIM].set(0.0)
    params["lm_head"] = head.at[BIAS_DIM, IM_END].set(stop_boost).at[BIAS_DIM, EOS].set(-1e3)
    return params


def _prompts(cfg):
    rng = np.random.default_rng(0)
    return [rng.integers(1, cfg.vocab_size, size=n).astype(np.int32) for n in (11, 6)]


def _reference(params, cfg, prompts, new, depth=None):
    """Greedy decoding by re-running ``transformer.forward`` on the whole sequence each time.

    Sequences are right-padded to a fixed length; under the causal mask later slots cannot
    change earlier logits, so this is the plain full recompute with a single compile. With
    ``depth`` (one per prompt) the forward is ``forward_adaptive`` frozen after that depth.
    """
    if depth is None:
        fwd = jax.jit(functools.partial(tr.forward, cfg=cfg))
    else:
        fwd = jax.jit(lambda p, t, d: tr.forward_adaptive(p, t, cfg, depth=d))
    toks, logps = [], []
    for row, p in enumerate(prompts):
        seq, out, lp = list(p), [], []
        extra = () if depth is None else (jnp.asarray([depth[row]]),)
        for _ in range(new):
            buf = np.full((1, REF_LEN), PAD, np.int32)
            buf[0, :len(seq)] = seq
            logits = np.asarray(fwd(params, jnp.asarray(buf), *extra)[0][0, len(seq) - 1])
            t = int(np.argmax(logits))
            lp.append(float(jax.nn.log_softmax(jnp.asarray(logits))[t]))
            out.append(t)
            seq.append(t)
            if t in (IM_END, EOS):
                break
        toks.append(out)
        logps.append(lp)
    return toks, logps


def _check_against_reference(params, cfg, prompts, new):
    tokens, lengths = left_pad(prompts)
    gen = generate(params, jnp.asarray(tokens), jnp.asarray(lengths), cfg, max_new_tokens=new)
    np.testing.assert_array_equal(gen.steps, cfg.max_refinement_steps)  # the head never halts
    ref_toks, ref_lp = _reference(params, cfg, prompts, new)
    out = np.asarray(gen.tokens)
    for row, (rt, rl) in enumerate(zip(ref_toks, ref_lp, strict=True)):
        n = int(gen.num_generated[row])
        assert n == len(rt)
        np.testing.assert_array_equal(out[row, :n], rt)
        assert np.all(out[row, n:] == PAD)
        np.testing.assert_allclose(float(gen.mean_logprob[row]), np.mean(rl), atol=1e-5)
    return gen, ref_toks


@pytest.mark.parametrize("rope", ["none", "rope1d", "rope2d"])
@pytest.mark.parametrize("use_ffn", [True, False])
@pytest.mark.parametrize("layout", ["latent_heads", "qkv_routers"])
def test_kv_cache_equals_full_recompute(rope, use_ffn, layout):
    cfg = tiny_model_config(rope=rope, use_ffn=use_ffn, attn_layout=layout)
    params = _model(cfg)
    prompts = _prompts(cfg)
    gen, ref = _check_against_reference(params, cfg, prompts, NEW)
    assert [len(r) for r in ref] == [NEW, NEW]  # stop tokens are suppressed: full-length check
    assert len({tuple(r) for r in ref}) == 2  # the two rows really differ


@pytest.mark.parametrize("layout", ["latent_heads", "qkv_routers"])
def test_left_padding_does_not_change_a_row(layout):
    cfg = tiny_model_config(rope="rope1d", attn_layout=layout)
    params = _model(cfg)
    p = _prompts(cfg)[1]
    alone = generate(params, jnp.asarray(p[None]), jnp.asarray([len(p)]), cfg, max_new_tokens=8)
    tokens, lengths = left_pad([p], length=16)
    padded = generate(params, jnp.asarray(tokens), jnp.asarray(lengths), cfg, max_new_tokens=8)
    np.testing.assert_array_equal(alone.tokens, padded.tokens)
    np.testing.assert_allclose(alone.mean_logprob, padded.mean_logprob, atol=1e-6)


def test_stops_at_im_end_immediately():
    cfg = tiny_model_config()
    params = _model(cfg, stop_boost=1e3)  # token 7 dominates every position
    tokens, lengths = left_pad(_prompts(cfg))
    gen = generate(params, jnp.asarray(tokens), jnp.asarray(lengths), cfg, max_new_tokens=12)
    np.testing.assert_array_equal(gen.num_generated, [1, 1])
    np.testing.assert_array_equal(gen.tokens[:, 0], [IM_END, IM_END])
    assert np.all(np.asarray(gen.tokens[:, 1:]) == PAD)
    assert np.all(np.asarray(gen.mean_logprob) > -1e-3)  # a near-certain token


def _first_record_low(g: np.ndarray) -> int:
    """First index j >= 1 with g[j] < min(g[:j]), or 0 when there is none."""
    prev_min = np.minimum.accumulate(g)[:-1]
    lows = np.flatnonzero(g[1:] < prev_min)
    return 1 + int(lows[0]) if lows.size else 0


def test_rows_stop_at_different_steps():
    cfg = tiny_model_config()
    prompts = _prompts(cfg)
    # Free-running trajectories (stops suppressed) and, at each step, the bias on token 7 that
    # would make it win: g = max logit - (logit of 7 without its -1e3 bias).
    free = _model(cfg)
    toks, _ = _reference(free, cfg, prompts, NEW)
    fwd = jax.jit(functools.partial(tr.forward, cfg=cfg))
    for row in range(2):
        buf = np.full((1, REF_LEN), PAD, np.int32)
        seq = np.concatenate([prompts[row], toks[row]])
        buf[0, :len(seq)] = seq
        logits = np.asarray(fwd(free, jnp.asarray(buf))[0][0, len(prompts[row]) - 1:-1])
        g = logits[:NEW].max(-1) - (logits[:NEW, IM_END] + 1e3)
        target = _first_record_low(g)
        if target:
            break
    assert target, "no step where token 7 gets closer to winning than before; change the seed"
    # A bias halfway between g[target] and every earlier g lets 7 win at `target` and nowhere
    # before, so this row's trajectory is unchanged up to its stop.
    params = _model(cfg, stop_boost=float(g[target] + g[:target].min()) / 2)
    gen, ref = _check_against_reference(params, cfg, prompts, NEW)
    assert int(gen.num_generated[row]) == target + 1 < NEW
    assert ref[row][-1] == IM_END


def test_left_pad_rejects_bad_prompts():
    with pytest.raises(ValueError, match="empty"):
        left_pad([np.array([1, 2]), np.array([], np.int32)])
    with pytest.raises(ValueError, match="does not fit"):
        left_pad([np.arange(5)], length=3)


# Adaptive depth: each row's depth is decided once from its prompt (prefill), then frozen.

def _adaptive_case(rule):
    """Config, params and the two prompts, which get different depths under ``rule``."""
    cfg = tiny_model_config(rope="rope1d", max_refinement_steps=3, halting=rule)
    params = _model(cfg)
    prompts = _prompts(cfg)
    readout = tr.make_readout(cfg)
    steps = [tr.forward(params, jnp.asarray(p[None]), cfg)[1].steps for p in prompts]
    if rule == "learned":
        # Point the head along the difference of the prompts' pooled states after step 1, so
        # row 0 halts at once and row 1 does not.
        h0, h1 = (np.asarray(readout(params, st.hidden[0])[0][0]).mean(0) for st in steps)
        d = h0 - h1
        c = 50.0 / float(d @ d)
        params["halt"]["w"] = jnp.stack([jnp.asarray(c * d), jnp.zeros_like(d)], axis=1)
        params["halt"]["b"] = jnp.array([-c * float(d @ (h0 + h1)) / 2, 0.0])
        return cfg, params, prompts
    # Uncertainty: a tau between the prompts' entropies that gives them different depths.
    # Each prompt's step logits (S,T,V) as S rows of row_entropy: e (S, 2).
    e = np.stack([np.asarray(halting.row_entropy(st.logits[:, 0], jnp.ones(st.logits.shape[::2])))
                  for st in steps], axis=1)
    values = np.unique(e)
    for tau in (values[1:] + values[:-1]) / 2:
        below = e < tau
        depth = np.where(below.any(0), below.argmax(0) + 1, cfg.max_refinement_steps)
        if depth[0] != depth[1]:
            return dataclasses.replace(cfg, halt_tau=float(tau)), params, prompts
    raise AssertionError(f"no tau separates the prompts' depths: {e}; change the seed")


@pytest.mark.parametrize("rule", ["learned", "uncertainty"])
def test_adaptive_depth_kv_cache_equals_recompute_at_the_same_depth(rule):
    cfg, params, prompts = _adaptive_case(rule)
    tokens, lengths = left_pad(prompts)
    gen = generate(params, jnp.asarray(tokens), jnp.asarray(lengths), cfg, max_new_tokens=NEW)
    depth = np.asarray(gen.steps)
    # The depth is the rule's on the prompt alone (forward_adaptive on the unpadded prompt).
    alone = [int(tr.forward_adaptive(params, jnp.asarray(p[None]), cfg)[1][0]) for p in prompts]
    np.testing.assert_array_equal(depth, alone)
    assert depth[0] != depth[1] and depth.min() < cfg.max_refinement_steps
    ref_toks, ref_lp = _reference(params, cfg, prompts, NEW, depth=depth)
    out = np.asarray(gen.tokens)
    for row, (rt, rl) in enumerate(zip(ref_toks, ref_lp, strict=True)):
        n = int(gen.num_generated[row])
        assert n == len(rt) == NEW
        np.testing.assert_array_equal(out[row, :n], rt)
        np.testing.assert_allclose(float(gen.mean_logprob[row]), np.mean(rl), atol=1e-5)
    # Freezing matters: at full depth the shallow row decodes to other tokens or log-probs.
    early = int(np.argmin(depth))
    full_toks, full_lp = _reference(params, cfg, [prompts[early]], NEW)
    assert full_toks[0] != ref_toks[early] or abs(np.mean(full_lp[0]) - np.mean(ref_lp[early])) \
        > 1e-3


@pytest.mark.parametrize("pool", [False, True])
def test_generate_by_recompute_equals_kv_cache_generate(pool):
    """Also with an expert pool: the KV-cache decoder routes over the live experts only, like
    the full forward (``family.logits`` with the pool)."""
    kw = dict(lifecycle_period=2, init_attn_experts=2, init_ffn_experts=3) if pool else {}
    cfg = tiny_model_config(rope="rope1d", **kw)
    params = _model(cfg)
    extras = DYNTRM.init(jax.random.key(0), Config(model=cfg))[1]
    assert (extras is not None) == pool
    live = None if extras is None else extras.live
    tokens, lengths = (jnp.asarray(a) for a in left_pad(_prompts(cfg)))
    gen = generate(params, tokens, lengths, cfg, max_new_tokens=NEW, live=live)
    if pool:  # the dead experts matter: routing over every expert decodes differently
        everyone = generate(params, tokens, lengths, cfg, max_new_tokens=NEW)
        assert not np.allclose(everyone.mean_logprob, gen.mean_logprob, atol=1e-4)
    logits_fn = FamilyLogits(DYNTRM, Config(model=cfg))
    rec = generate_by_recompute(logits_fn, (params, extras), tokens, lengths,
                                max_new_tokens=NEW)
    assert rec.steps is None
    np.testing.assert_array_equal(rec.tokens, gen.tokens)
    np.testing.assert_array_equal(rec.num_generated, gen.num_generated)
    np.testing.assert_allclose(rec.mean_logprob, gen.mean_logprob, atol=1e-5)
    assert len({tuple(r) for r in np.asarray(gen.tokens).tolist()}) == 2
