"""Adaptive depth (seed 000 section 4): the halting rules, ``forward_adaptive`` with each rule or a
given per-row depth, and the ACT loss that trains the learned rule."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from tinyonn_jax import loss as task_loss
from tinyonn_jax.config import Config, apply_overrides
from tinyonn_jax.errors import ConfigError
from tinyonn_jax.families.dyntrm import halting, modules
from tinyonn_jax.families.dyntrm import transformer as tr

S, B, T = 4, 3, 6


def _setup(**kw):
    cfg = tiny_model_config(max_refinement_steps=S, **kw)
    params = modules.init_params(jax.random.key(0), cfg)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    return cfg, params, tokens


def _entropy(logits: np.ndarray) -> np.ndarray:
    """Softmax entropy (nats) over the last axis, in float64."""
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1)


def _first_below(e: np.ndarray, tau: float) -> np.ndarray:
    """Depth per row from per-step values e (S, B): first step with e < tau, else S (1-based)."""
    below = e < tau
    return np.where(below.any(0), below.argmax(0) + 1, e.shape[0])


def test_config_fields_are_validated():
    cfg = tiny_model_config()
    assert cfg.halting == "learned"  # today's behaviour stays the default
    with pytest.raises(ConfigError, match=r"model\.halting='entropy'"):
        tiny_model_config(halting="entropy")
    for tau in (0.0, -1.0):
        with pytest.raises(ConfigError, match=r"model\.halt_tau"):
            tiny_model_config(halt_tau=tau)
    with pytest.raises(ConfigError, match=r"model\.halt_tau"):
        tiny_model_config(halt_tau=float("nan"))
    cfg = apply_overrides(Config(), ["model.halting=uncertainty", "model.halt_tau=0.3"])
    assert (cfg.model.halting, cfg.model.halt_tau) == ("uncertainty", 0.3)


def test_row_entropy_and_uncertainty_rule_against_numpy():
    logits = np.asarray(jax.random.normal(jax.random.key(0), (3, 5, 6))) * 3.0
    valid = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], np.float32)
    got = np.asarray(halting.row_entropy(jnp.asarray(logits), jnp.asarray(valid)))
    per_token = _entropy(logits)
    want = [per_token[0].mean(), per_token[1, 2:4].mean(), 0.0]  # no valid token: 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    tau = float(np.mean(want[:2]))  # between the two rows
    stop = np.asarray(halting.uncertainty_stop(jnp.asarray(logits), jnp.asarray(valid), tau))
    np.testing.assert_array_equal(stop, np.array(want) < tau)
    assert stop[0] != stop[1]


def test_learned_rule_is_the_act_head_on_valid_tokens():
    k = jax.random.split(jax.random.key(2), 3)
    h = np.asarray(jax.random.normal(k[0], (2, 4, 8)))
    w = np.asarray(jax.random.normal(k[1], (8, 2)))
    b = np.array([0.3, -0.2], np.float32)
    valid = np.array([[1, 1, 0, 0], [0, 1, 1, 1]], np.float32)
    pooled = np.stack([h[0, :2].mean(0), h[1, 1:].mean(0)])
    q = pooled @ w + b
    head = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
    np.testing.assert_allclose(halting.halting_logits(head, jnp.asarray(h), jnp.asarray(valid)),
                               q, rtol=1e-5, atol=1e-5)
    p = 1 / (1 + np.exp(-(q[:, 0] - q[:, 1])))
    thr = float(np.mean(p))
    stop = halting.learned_stop(head, jnp.asarray(h), jnp.asarray(valid), thr)
    np.testing.assert_array_equal(stop, p > thr)
    assert np.asarray(stop).any() and not np.asarray(stop).all()


def test_uncertainty_rule_halts_each_row_at_its_first_certain_step():
    cfg, params, tokens = _setup()
    _, aux = tr.forward(params, tokens, cfg)
    step_logits = np.asarray(aux.steps.logits)  # (S,B,T,V)
    e = _entropy(step_logits).mean(-1)  # (S,B): every token is valid
    # The tau (a midpoint between observed entropies) that spreads the rows' depths the most.
    values = np.unique(e)
    taus = (values[1:] + values[:-1]) / 2
    tau = max(taus, key=lambda t: (len(set(_first_below(e, t))), -abs(t - np.median(e))))
    depth = _first_below(e, tau)
    assert len(set(depth)) >= 2 and depth.min() < S, (e, depth)
    cfg_u = dataclasses.replace(cfg, halting="uncertainty", halt_tau=float(tau))
    logits, steps = jax.jit(lambda p, t: tr.forward_adaptive(p, t, cfg_u))(params, tokens)
    np.testing.assert_array_equal(steps, depth)
    for row in range(B):
        np.testing.assert_allclose(logits[row], step_logits[depth[row] - 1, row],
                                   rtol=1e-5, atol=1e-5)


def test_rule_none_runs_every_step_even_when_the_head_would_stop():
    cfg, params, tokens = _setup()
    params["halt"]["b"] = jnp.array([50.0, 0.0])  # the learned rule stops after one step
    full, aux = tr.forward(params, tokens, cfg)
    _, steps = tr.forward_adaptive(params, tokens, cfg)
    np.testing.assert_array_equal(steps, [1] * B)
    logits, steps = tr.forward_adaptive(params, tokens, dataclasses.replace(cfg, halting="none"))
    np.testing.assert_array_equal(steps, [S] * B)
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_depth_argument_freezes_each_row_after_its_depth(jit):
    cfg, params, tokens = _setup()
    params["halt"]["b"] = jnp.array([50.0, 0.0])  # a given depth overrides the rule
    _, aux = tr.forward(params, tokens, cfg)
    run = lambda d: tr.forward_adaptive(params, tokens, cfg, depth=d)  # noqa: E731
    if jit:
        run = jax.jit(run)
    logits, steps = run(jnp.array([0, 2, S + 3]))  # clipped to [1, S]
    np.testing.assert_array_equal(steps, [1, 2, S])
    for row, d in enumerate([1, 2, S]):
        np.testing.assert_allclose(logits[row], aux.steps.logits[d - 1, row],
                                   rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[0], aux.steps.logits[-1, 0], atol=1e-3)  # depth mattered


# The ACT loss: BCE of q_halt - q_continue against "this step's prediction is exactly right".

def _act_case():
    """S=2 steps, B=3 rows, T=3 tokens, V=4. Row 2 has no weighted token (ignored)."""
    targets = np.array([[0, 1, 2], [3, 3, 1], [2, 2, 2]], np.int32)
    weights = np.array([[0, 1, 1], [1, 1, 0], [0, 0, 0]], np.float32)
    pred = np.array([[[3, 1, 2], [3, 0, 0], [2, 2, 2]],    # step 0: row 0 exact, row 1 wrong
                     [[0, 1, 0], [3, 3, 2], [1, 1, 1]]])   # step 1: row 0 wrong, row 1 exact
    step_logits = 5.0 * np.eye(4, dtype=np.float32)[pred]  # (S,B,T,V)
    halt = np.array([[[1.0, -0.5], [0.2, 0.3], [3.0, 0.0]],
                     [[-2.0, 0.5], [0.7, -1.0], [0.0, 5.0]]], np.float32)
    correct = {(0, 0): 1, (0, 1): 0, (1, 0): 0, (1, 1): 1}  # (step, row) -> exact, rows 0-1
    return targets, weights, step_logits, halt, correct


def _hand_act_loss(halt, correct) -> float:
    total = 0.0
    for (s, b), c in correct.items():
        x = float(halt[s, b, 0] - halt[s, b, 1])
        p = 1.0 / (1.0 + math.exp(-x))
        total += -(c * math.log(p) + (1 - c) * math.log(1 - p))
    return total / len(correct)  # mean over (step, row with weighted tokens)


def test_act_loss_equals_hand_computation():
    targets, weights, step_logits, halt, correct = _act_case()
    args = (jnp.asarray(step_logits), jnp.asarray(targets), jnp.asarray(weights))
    got = float(task_loss.act_loss(jnp.asarray(halt), *args))
    np.testing.assert_allclose(got, _hand_act_loss(halt, correct), rtol=1e-6)
    other = halt.copy()
    other[:, 2] = [[-9.0, 9.0], [9.0, -9.0]]  # the row without weighted tokens does not count
    assert float(task_loss.act_loss(jnp.asarray(other), *args)) == pytest.approx(got, rel=1e-6)
    assert got != pytest.approx(_hand_act_loss(halt, {k: 1 - c for k, c in correct.items()}))


def test_act_loss_gradient_reaches_the_halting_logits_only():
    targets, weights, step_logits, halt, correct = _act_case()
    g_halt, g_logits = jax.grad(task_loss.act_loss, argnums=(0, 1))(
        jnp.asarray(halt), jnp.asarray(step_logits), jnp.asarray(targets), jnp.asarray(weights))
    assert np.all(np.asarray(g_logits) == 0.0)  # exactness is a target, not a path
    want = np.zeros_like(halt)
    for (s, b), c in correct.items():  # d BCE / dx = sigmoid(x) - c, x = q_halt - q_continue
        x = float(halt[s, b, 0] - halt[s, b, 1])
        g = (1.0 / (1.0 + math.exp(-x)) - c) / len(correct)
        want[s, b] = [g, -g]
    np.testing.assert_allclose(g_halt, want, rtol=1e-5, atol=1e-7)


def test_act_loss_gradient_in_the_model():
    """Through the model the ACT loss trains the halting head (checked against the hand formula
    dL/dw = sum_{s,b} pooled_{s,b} (g, -g)) and, through the state the head reads, the trunk;
    the LM head, which reaches it only through the exactness targets, gets exactly zero."""
    cfg, params, tokens = _setup()
    # The initial head reads nothing (w = 0); a random one passes a gradient to the trunk.
    params["halt"]["w"] = 0.3 * jax.random.normal(jax.random.key(4), (cfg.hidden, 2))
    _, aux = tr.forward(params, tokens, cfg)
    targets = np.array(jax.random.randint(jax.random.key(3), (B, T), 0, cfg.vocab_size))
    targets[0] = np.argmax(np.asarray(aux.steps.logits[0, 0]), -1)  # row 0 exact at step 0
    weights = np.zeros((B, T), np.float32)
    weights[:, T // 2:] = 1.0

    def act(p):
        _, a = tr.forward(p, tokens, cfg)
        return task_loss.act_loss(a.steps.halt_logits, a.steps.logits, jnp.asarray(targets),
                                  jnp.asarray(weights))

    grads = jax.grad(act)(params)
    assert np.all(np.asarray(grads["lm_head"]) == 0.0)
    assert float(jnp.abs(grads["embed"]).sum()) > 0.0

    step_logits, q = np.asarray(aux.steps.logits), np.asarray(aux.steps.halt_logits)
    exact = np.all((step_logits.argmax(-1) == targets) | (weights <= 0), axis=-1)  # (S,B)
    assert exact[0, 0] and not exact.all()
    g = (1.0 / (1.0 + np.exp(-(q[..., 0] - q[..., 1]))) - exact) / (S * B)  # (S,B)
    h = np.stack([np.asarray(tr.make_readout(cfg)(params, x)[0]) for x in aux.steps.hidden])
    pooled = h.mean(axis=2)  # (S,B,D): every token is valid
    gq = np.stack([g, -g], -1)  # (S,B,2)
    np.testing.assert_allclose(grads["halt"]["w"], np.einsum("sbd,sbk->dk", pooled, gq),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["halt"]["b"], gq.sum((0, 1)), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("rule", "tau", "want"), [
    ("uncertainty", 5.0, 1.0),  # every output entropy is below 5 nats > ln 18: stop after 1
    ("uncertainty", 1e-6, 2.0),  # never that certain: all steps
    ("none", 5.0, 2.0), ("learned", 5.0, 2.0)])  # the fresh ACT head never halts
def test_train_metric_halt_steps_follows_the_configured_rule(rule, tau, want):
    from tinyonn_jax.families.dyntrm.family import DYNTRM

    cfg = Config(model=tiny_model_config(halting=rule, halt_tau=tau))
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.model.vocab_size)
    batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:], weights=jnp.ones((2, 8)),
                 positions=jnp.broadcast_to(jnp.arange(8), (2, 8)),
                 segment_ids=jnp.ones((2, 8), jnp.int32))
    _, m = DYNTRM.make_train_step(cfg, opt, donate=False)(state, batch)
    assert float(m["act/halt_steps"]) == want
