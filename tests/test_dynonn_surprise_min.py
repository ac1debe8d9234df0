"""SurpriseMinLoss in the seed-002 form (gating_loss="surprise_min"): its value by hand, the
direction of its gradient, its place in the gate objective, and a full train step with the
gradient fuse; the seed-002 metric names of the family's step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyonn_jax.config import Config, OptimizerConfig
from tinyonn_jax.errors import ConfigError
from tinyonn_jax.families.dynonn import gating, modules
from tinyonn_jax.families.dynonn import model as dynonn
from tinyonn_jax.families.dynonn import step as ms
from tinyonn_jax.families.dynonn.family import DYNONN

# Two tokens, four slots; slot 3 is dead (its margin 9 would win any softmax it entered).
LIVE = jnp.array([True, True, True, False])
MASK = jnp.array([[True, True, False, False], [False, True, True, False]])
S = jnp.array([[0.5, 0.2, 0.0, 0.0],  # token 0: routed {0, 1}; unrouted slot 2 has S = 0
               [0.0, 0.3, 0.9, 0.0]])  # token 1: routed {1, 2}
MARGIN = jnp.array([[1.0, -0.5, 0.3, 9.0], [0.2, -1.0, 0.7, 9.0]])
VALID = jnp.ones((2,))


def _by_hand(margin: np.ndarray) -> tuple[float, float]:
    """CE and KL of the two tokens above, written out with numpy."""
    ce, kl = [], []
    for t, (routed, target) in enumerate((([0, 1], 1), ([1, 2], 1))):
        q = np.exp(margin[t, :3]) / np.exp(margin[t, :3]).sum()  # live slots only
        s = np.asarray(S)[t, routed]
        p = np.exp(-s) / np.exp(-s).sum()  # routed slots only
        ce.append(-np.log(q[target]))
        kl.append(np.sum(p * (np.log(p) - np.log(q[routed]))))
    return float(np.mean(ce)), float(np.mean(kl))


def test_config_fields_are_validated():
    cfg = dynonn.DynOnnConfig()
    assert (cfg.gating_loss, cfg.w_ce, cfg.w_kl) == ("pi_adaptive", 1.0, 1.0)
    with pytest.raises(ConfigError, match="gating_loss"):
        dynonn.DynOnnConfig(gating_loss="smk")
    with pytest.raises(ConfigError, match="w_kl"):
        dynonn.DynOnnConfig(w_kl=-1.0)


def test_loss_value_by_hand():
    ce, kl = gating.surprise_min_loss(MARGIN, MASK, LIVE, S, VALID)
    want_ce, want_kl = _by_hand(np.asarray(MARGIN, np.float64))
    np.testing.assert_allclose(ce, want_ce, rtol=1e-6)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-6)
    # A token the loss does not see (S = 0 on every routed expert) does not count.
    s0 = S.at[1].set(0.0)
    ce0, _ = gating.surprise_min_loss(MARGIN, MASK, LIVE, s0, VALID)
    q = np.exp(np.asarray(MARGIN[0, :3])) / np.exp(np.asarray(MARGIN[0, :3])).sum()
    np.testing.assert_allclose(ce0, -np.log(q[1]), rtol=1e-6)


def test_gradient_moves_routing_toward_the_least_surprised_routed_expert():
    """Gradient descent on the routing logits raises the routed expert of least surprise
    until it is the gate's first choice; an unrouted expert with S = 0 is pushed down, the dead
    slot gets no gradient. A flipped sign moves the other way."""
    def loss(m):
        ce, kl = gating.surprise_min_loss(m, MASK, LIVE, S, VALID)
        return ce + kl

    g = np.asarray(jax.grad(loss)(MARGIN))
    assert g[0, 1] < 0 and g[1, 1] < 0  # the targets (least S among routed)
    assert g[0, 2] > 0  # unrouted, S = 0: not a target (the original's bug)
    assert np.all(g[:, 3] == 0)  # dead

    def share(m):  # probability of the target among live experts
        return np.asarray(jax.nn.softmax(jnp.where(LIVE, m, -jnp.inf), axis=-1)[:, 1])

    m = MARGIN
    assert np.all(np.argmax(np.where(LIVE, m, -np.inf), -1) != 1)
    shares = [share(m)]
    for _ in range(20):
        m = m - 0.5 * jax.grad(loss)(m)
        shares.append(share(m))
    assert np.all(np.diff(np.stack(shares), axis=0) > 0)
    np.testing.assert_array_equal(np.argmax(np.where(LIVE, m, -np.inf), -1), [1, 1])
    np.testing.assert_allclose(gating.gating_acc(m, MASK, S, VALID), 1.0)


CFG = dynonn.DynOnnConfig(hidden=16, num_heads=2, head_dim=4, ffn_hidden=8, num_layers=2,
                          max_experts=4, init_experts=3, w_sdl=0.0, gating_loss="surprise_min",
                          w_ce=2.0, w_kl=0.5)
B, T = 2, 8


def _batch(cfg, seed=0):
    toks = jax.random.randint(jax.random.key(seed + 7), (B, T + 1), 0, cfg.vocab_size)
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], weights=jnp.ones((B, T)),
                segment_ids=jnp.ones((B, T), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))


def test_objective_is_the_weighted_sum_and_descends():
    """gating_objective under surprise_min == w_ce CE + w_kl KL, whatever lambda; one small
    step along its gradient (gate parameters only) lowers it."""
    params = modules.init_params(jax.random.key(0), CFG)
    batch = _batch(CFG)
    _, _, out = jax.jit(ms.compute_gradients, static_argnums=3)(
        params, dynonn.init_live(CFG), batch, CFG)
    valid = jnp.ones((B, T))
    live = dynonn.init_live(CFG)
    objective = jax.jit(gating.gating_objective, static_argnums=6)
    args = (out["aux"], out["surprise"], valid, live)
    a, parts = objective(params, *args, jnp.float32(0.0), CFG)
    b, _ = objective(params, *args, jnp.float32(1.0), CFG)
    np.testing.assert_allclose(a, 2.0 * parts["loss_ce"] + 0.5 * parts["loss_kl"], rtol=1e-6)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(a, out["gating_loss"], rtol=1e-5)
    assert float(parts["loss_ce"]) > 0 and float(parts["loss_kl"]) > 0
    g = jax.grad(lambda p: objective(p, *args, jnp.float32(0.5), CFG)[0])(params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
        if str(path[-1].key) not in ("proto_sim", "gates", "gate_log_scale"):
            assert np.all(np.asarray(leaf) == 0), path
    stepped = jax.tree.map(lambda p, d: p - 1e-3 * d, params, g)
    assert float(objective(stepped, *args, jnp.float32(0.5), CFG)[0]) < float(a)


ADAM = OptimizerConfig(name="adam", kwargs=(), learning_rate=1e-2)


def _one_step(cfg):
    full = Config(family="dynonn", model=cfg, optim=ADAM, meta_optim=ADAM)
    opt = DYNONN.build_optimizer(full)
    state = DYNONN.init_state(full, opt, jax.random.key(0))
    before = jax.tree.map(np.array, state.params)
    state, m = DYNONN.make_train_step(full, opt)(state, _batch(cfg))
    return before, jax.tree.map(np.asarray, state.params), jax.device_get(m)


def test_train_step_fuses_bad_experts_and_reports_seed002_metrics():
    """A full train step (surprise_min, fuse on, sigma 0 so every gate's experts above the mean
    surprise are fused): a fused expert's main-gradient rows leave its weights exactly
    unchanged, routed unfused experts move; without the fuse the same experts move."""
    cfg = dataclasses.replace(CFG, fuse=True, fuse_sigma=0.0)
    before, after, m = _one_step(cfg)
    _, after_nofuse, m_nofuse = _one_step(dataclasses.replace(cfg, fuse=False))
    assert int(m["train/update_ok"]) == 1 and int(m_nofuse["sars/fused_experts"]) == 0
    n_fused = 0
    for site in dynonn.SITES:
        fused = np.asarray(m[f"experts/fused/{site}"]) > 0  # (G, E)
        used = np.asarray(m[f"experts/usage_by_layer/{site}"]) > 0
        assert fused.shape == (cfg.groups, cfg.max_experts) and not np.any(fused & ~used)
        n_fused += int(fused.sum())
        assert np.any(used & ~fused)
        for name in ("wq", "wk", "wv", "wo") if site == "attn" else ("w1", "w2"):
            moved = np.abs(after["layers"][site][name] - before["layers"][site][name])
            moved_nofuse = np.abs(after_nofuse["layers"][site][name]
                                  - before["layers"][site][name])
            per_expert = moved.reshape(cfg.groups, cfg.max_experts, -1).max(-1)
            per_expert_nofuse = moved_nofuse.reshape(cfg.groups, cfg.max_experts, -1).max(-1)
            assert np.all(per_expert[fused] == 0), (site, name)
            assert np.all(per_expert_nofuse[fused] > 0), (site, name)
            assert np.all(per_expert[used & ~fused] > 0), (site, name)
    assert n_fused == int(m["sars/fused_experts"]) > 0
    # Seed 002's metric names (read by the dashboards), and their meaning where it is simple.
    for k in ("train/main_loss", "train/main_acc", "train/gating_loss", "train/sparsity_loss",
              "train/avg_k", "train/gating_acc", "train/surprise", "train/pi_score",
              "train/tau", "train/num_experts", "train/lambda"):
        assert np.shape(m[k]) == () and np.isfinite(float(m[k])), k
    assert float(m["train/main_acc"]) == float(m["train/token_acc"])
    np.testing.assert_allclose(m["train/avg_k"],
                               (m["route/avg_k/attn"] + m["route/avg_k/ffn"]) / 2, rtol=1e-6)
    assert int(m["train/num_experts"]) == 2 * cfg.groups * cfg.init_experts
    np.testing.assert_allclose(m["train/gating_loss"],
                               2.0 * m["gate/loss_ce"] + 0.5 * m["gate/loss_kl"], rtol=1e-5)
    assert float(m["train/lambda"]) == float(m["gate/lambda"])
    assert float(m["train/sparsity_loss"]) == float(m["gate/sparsity"])
