"""SPL protection (seed 001, endogenous ranking) and the SPL step's seed-002 metrics.

Protection rule ``seed``: p_j = exp(-r_j / T), r_j the global mid-rank of ||g_j|| in [0, 1),
T = T_min + (T_max - T_min) EMA_acc. Checked against a brute-force O(M^2) ranking in numpy.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import packed_batch

from tinyonn_jax import metrics
from tinyonn_jax.config import Config, OptimizerConfig
from tinyonn_jax.errors import ConfigError
from tinyonn_jax.families.spl import model as spl
from tinyonn_jax.families.spl import modules as sm
from tinyonn_jax.families.spl import msaps as ms
from tinyonn_jax.families.spl import step as ss
from tinyonn_jax.families.spl.config import SplConfig
from tinyonn_jax.families.spl.family import SPL
from tinyonn_jax.nn import variables

B, T = 2, 8
CFG = SplConfig(hidden=16, num_layers=2, moie_mult=2, init_std=0.5, prc=False, mask_mode="hard")
NONE = dataclasses.replace(CFG, protection="none")
ORIGINAL = dataclasses.replace(CFG, protection="original")


def _full(cfg: SplConfig) -> Config:
    return Config(family="spl", model=cfg,
                  optim=OptimizerConfig(name="sgd", learning_rate=0.1, kwargs=()),
                  meta_optim=OptimizerConfig(name="sgd", learning_rate=0.5, kwargs=()))


def _np_mid_rank(v: np.ndarray) -> np.ndarray:
    """Brute force: (#strictly smaller + (#equal - 1) / 2) / M for every entry."""
    less = (v[None, :] < v[:, None]).sum(1)
    equal = (v[None, :] == v[:, None]).sum(1)
    return (less + (equal - 1) / 2) / v.size


def _np_seed_probs(norms: np.ndarray, acc: float, cfg: SplConfig) -> np.ndarray:
    temp = cfg.min_temperature + (cfg.max_temperature - cfg.min_temperature) * acc
    return np.exp(-_np_mid_rank(norms) / temp)


def _random_gates(cfg: SplConfig, seed: int, ties: bool = True) -> dict:
    """Gates (L_p, N, I) per kind with spread-out row norms; with ``ties`` some rows repeated
    (equal norms across kinds and layers) and one row of norm 0 (the unique best)."""
    gates = {}
    for i, k in enumerate(cfg.kinds):
        d_in, n = cfg.dims(k)
        key = jax.random.key(seed * 100 + i)
        g = jax.random.normal(key, (cfg.num_param_layers, n, d_in))
        scale = jnp.exp(jax.random.normal(jax.random.fold_in(key, 1), g.shape[:2] + (1,)))
        gates[k] = g * scale
    if ties:
        row = gates["q"][0, 3]
        gates["k"] = gates["k"].at[1, 2].set(row)  # same norm in another kind and layer
        gates["v"] = gates["v"].at[0, 5].set(-row)
        gates["o"] = gates["o"].at[1, 7].set(0.0)  # the unique best
    return gates


def _flat_norms(gates: dict) -> np.ndarray:
    return np.concatenate([np.linalg.norm(np.asarray(g, np.float64), axis=-1).ravel()
                           for g in gates.values()]).astype(np.float32)


def _flat(prot: dict, kinds) -> np.ndarray:
    return np.concatenate([np.asarray(prot[k]).ravel() for k in kinds])


def test_config_validates_the_protection_fields():
    with pytest.raises(ConfigError, match="model.protection"):
        SplConfig(protection="soft")
    with pytest.raises(ConfigError, match="model.max_temperature"):
        SplConfig(min_temperature=0.2, max_temperature=0.1)
    with pytest.raises(ConfigError, match="model.pi_gamma"):
        SplConfig(pi_gamma=1.5)
    assert SplConfig().protection == "seed"


def test_seed_protection_equals_ranked_formula_and_loosens_with_accuracy():
    gates = _random_gates(CFG, seed=1)
    norms = _flat_norms(gates)
    fn = jax.jit(ms.protection, static_argnums=2)
    probs, means, shares, temps = [], [], [], []
    for acc in (0.0, 0.25, 0.5, 0.75, 1.0):
        prot, temp = fn(gates, jnp.float32(acc), CFG)
        p = _flat(prot, CFG.kinds)
        np.testing.assert_allclose(p, _np_seed_probs(norms, acc, CFG), rtol=1e-5, atol=1e-7)
        probs.append(p)
        means.append(p.mean())
        shares.append((p > 0.5).mean())
        temps.append(float(temp))
    # Better accuracy -> looser: every neuron at least as protected, the mean strictly larger,
    # more neurons above 1/2; the temperature grows.
    for lo, hi in zip(probs[:-1], probs[1:], strict=True):
        assert np.all(hi >= lo)
    assert np.all(np.diff(means) > 0) and np.all(np.diff(temps) > 0)
    assert np.all(np.diff(shares) >= 0) and shares[-1] > 5 * shares[0]
    # The original rule runs the other way: its temperature shrinks as accuracy grows.
    t_orig = [float(fn(gates, jnp.float32(a), ORIGINAL)[1]) for a in (0.0, 0.5, 0.99)]
    assert np.all(np.diff(t_orig) < 0)


@pytest.mark.parametrize("acc", [0.0, 0.6])
def test_best_quality_neuron_is_protected_most(acc):
    gates = _random_gates(CFG, seed=2)
    norms = _flat_norms(gates)
    p = _flat(jax.jit(ms.protection, static_argnums=2)(gates, jnp.float32(acc), CFG)[0],
              CFG.kinds)
    best = np.argmin(norms)
    assert norms[best] == 0 and p[best] == 1.0 and np.sum(p == 1.0) == 1
    order = np.argsort(norms, kind="stable")  # ascending norm = descending quality
    assert np.all(np.diff(p[order]) <= 0)  # protection never rises as quality falls
    values, counts = np.unique(norms, return_counts=True)
    tied = norms == values[np.argmax(counts)]
    assert tied.sum() >= 3 and np.ptp(p[tied]) == 0  # equal norms, equal protection


@pytest.mark.parametrize("m", [60, 3001])
def test_protection_scale_does_not_collapse_with_the_number_of_neurons(m):
    norms = jnp.abs(jax.random.normal(jax.random.key(m), (m,)))
    assert np.unique(np.asarray(norms)).size == m
    for acc in (0.0, 0.3, 1.0):
        temp = float(ms.protection_temperature(jnp.float32(acc), CFG))
        p = np.asarray(ms.protection_probs(norms, jnp.float32(temp), "seed"))
        assert p.shape == (m,) and np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
        assert p.max() == 1.0
        # Share above 1/2 and mean are T ln 2 and T (1 - exp(-1/T)) up to 1/m, whatever m.
        assert abs((p > 0.5).mean() - temp * np.log(2)) <= 1.0 / m + 1e-6
        assert abs(p.mean() - temp * (1 - np.exp(-1 / temp))) <= 1.0 / m + 1e-6
    tied = norms.at[: m // 10].set(jnp.median(norms))  # a block of ties mid-way
    p = np.asarray(ms.protection_probs(tied, jnp.float32(0.2), "seed"))
    np.testing.assert_allclose(p, np.exp(-_np_mid_rank(np.asarray(tied)) / 0.2), rtol=1e-5,
                               atol=1e-7)
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1)) and p.max() == 1.0
    # The original softmax sums to 1 over the neurons: at this size its largest share is tiny.
    p_orig = np.asarray(ms.protection_probs(norms, jnp.float32(1.0), "original"))
    np.testing.assert_allclose(p_orig.sum(), 1.0, rtol=1e-5)
    assert p_orig.max() < 30.0 / m


_gradients = jax.jit(ss.gradients, static_argnums=3)


def _state_with_gates(cfg: SplConfig, seed: int) -> dict:
    params = sm.init_spl_params(jax.random.key(seed), cfg)
    gates = _random_gates(cfg, seed, ties=False)
    layers = {k: ({**v, "gate_param": 0.05 * gates[k]} if k in cfg.kinds else v)
              for k, v in params["layers"].items()}
    return {**params, "layers": layers}


def test_step_scales_each_proto_gradient_row_by_one_minus_p():
    params, batch, acc = _state_with_gates(CFG, 3), packed_batch(seed=3), 0.6
    seed_out = _gradients(params, jnp.float32(acc), batch, _full(CFG))
    none_out = _gradients(params, jnp.float32(acc), batch, _full(NONE))
    p = _np_seed_probs(_flat_norms({k: params["layers"][k]["gate_param"] for k in CFG.kinds}),
                       acc, CFG)
    assert 0.05 < p.mean() < 0.95 and (p > 0.5).any() and (p < 0.5).any()
    i, kept, total = 0, 0.0, 0.0
    for k in CFG.kinds:
        g_none = np.asarray(none_out.grads["layers"][k]["proto_weight"], np.float64)
        g_seed = np.asarray(seed_out.grads["layers"][k]["proto_weight"], np.float64)
        pk = p[i:i + g_none.shape[0] * g_none.shape[1]].reshape(g_none.shape[:2])
        i += pk.size
        np.testing.assert_allclose(g_seed, g_none * (1 - pk)[..., None], rtol=1e-5,
                                   atol=1e-6 * np.abs(g_none).max())
        kept += np.sum(np.square(g_none * (1 - pk)[..., None]))
        total += np.sum(np.square(g_none))
        assert np.abs(g_none).max() > 0
    # Nothing else changes: every other leaf has the unprotected gradient.
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(seed_out.grads),
                            jax.tree.leaves(none_out.grads), strict=True):
        if path[-1].key != "proto_weight":
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    ratio = np.sqrt(kept / total)
    np.testing.assert_allclose(float(seed_out.metrics["spl/proto_grad_kept"]), ratio, rtol=1e-5)
    assert ratio < 0.9  # protection changes the prototype update measurably
    assert float(none_out.metrics["spl/proto_grad_kept"]) == 1.0
    m = seed_out.metrics
    np.testing.assert_allclose(float(m["spl/protection_mean"]), p.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["spl/protection_min"]), p.min(), rtol=1e-5)
    assert float(m["spl/protection_max"]) == 1.0
    np.testing.assert_allclose(float(m["spl/protection_share"]), (p > 0.5).mean(), rtol=1e-6)


def test_sgd_step_applies_the_protected_proto_update():
    params, batch, acc = _state_with_gates(CFG, 4), packed_batch(seed=4), 0.6
    deltas = {}
    for name, cfg in (("seed", CFG), ("none", NONE)):
        opt = SPL.build_optimizer(_full(cfg))
        state = SPL.init_state(_full(cfg), opt, jax.random.key(0))
        state = state._replace(params=params, extras=jnp.float32(acc))
        new, m = SPL.make_train_step(_full(cfg), opt, donate=False)(state, batch)
        assert float(m["train/update_ok"]) == 1.0
        deltas[name] = {k: np.asarray(new.params["layers"][k]["proto_weight"], np.float64)
                        - np.asarray(params["layers"][k]["proto_weight"], np.float64)
                        for k in CFG.kinds}
    p = _np_seed_probs(_flat_norms({k: params["layers"][k]["gate_param"] for k in CFG.kinds}),
                       acc, CFG)
    i = 0
    for k in CFG.kinds:
        d_none, d_seed = deltas["none"][k], deltas["seed"][k]
        pk = p[i:i + d_none.shape[0] * d_none.shape[1]].reshape(d_none.shape[:2])
        i += pk.size
        scale = np.abs(np.asarray(params["layers"][k]["proto_weight"])).max()
        np.testing.assert_allclose(d_seed, d_none * (1 - pk)[..., None], rtol=1e-4,
                                   atol=2e-6 * scale)
        assert np.all(d_seed[pk == 1.0] == 0)  # the best neuron's prototype does not move


_spl_gradients = jax.jit(ss.spl_gradients, static_argnums=3)


def test_layer_token_surprise_equals_per_token_copies_of_mu():
    layer = sm.SplLayer(jax.random.key(5)[None], 6, 5, init_std=0.5)  # L = 1, in 6, N 5
    p = {k: v[0] for k, v in variables.pure_params(layer).items()}
    p["gate_param"] = 0.2 * jax.random.normal(jax.random.key(6), (5, 6))
    p["mu_bias"] = 0.1 * jax.random.normal(jax.random.key(7), (5,))
    x = jax.random.normal(jax.random.key(8), (7, 6))
    r = jax.random.normal(jax.random.key(9), (7, 5))  # dL/dM of L = sum(M * r)
    for activation in ("linear", "silu"):

        def loss(w_tok, activation=activation):  # one copy of mu_weight per token
            out = jax.vmap(lambda w, xt: spl.spl_apply({**p, "mu_weight": w}, xt, "hard",
                                                       activation=activation)[0])(w_tok, x)
            return jnp.sum(out * r)

        w_tok = jnp.broadcast_to(p["mu_weight"], (7,) + p["mu_weight"].shape)
        want = np.linalg.norm(np.asarray(jax.grad(loss)(w_tok), np.float64), axis=-1)  # (T,N)
        _, res = spl.spl_apply(p, x, "hard", activation=activation)
        got = ms.token_mu_surprise(res, r, activation)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7 * want.max())
        assert 0 < np.mean(want > 0) < 1  # some neurons masked off, some on


def test_step_emits_seed_002_metrics_equal_to_their_definitions():
    cfg, batch, acc = CFG, packed_batch(seed=5), 0.3
    params = _state_with_gates(cfg, 5)
    m = _gradients(params, jnp.float32(acc), batch, _full(cfg)).metrics
    probes = spl.spl_zero_probes(cfg, B, T)
    out = _spl_gradients(params, batch, jnp.float32(acc), cfg, probes)[3]
    aux, gp, info = out["aux"], out["g_probes"], out["info"]
    valid = np.asarray(batch["segment_ids"] > 0)
    n_tok = float(np.sum(batch["weights"]))
    s_all, hits, informative, k_sites, fired = [], 0, 0, [], 0
    for k in cfg.kinds:
        res = aux.residuals[k]
        s = np.asarray(ms.token_mu_surprise(res, gp[k], cfg.activation), np.float64) * n_tok
        on, raw = np.asarray(res.mask) > 0, np.asarray(res.raw)
        for site in range(cfg.num_sites):
            k_sites.append(on[site][valid].sum(-1).mean())
            for b in range(B):
                for t in range(T):
                    a = on[site, b, t]
                    if not valid[b, t]:
                        continue
                    s_all.extend(s[site, b, t][a])
                    if not np.any(a & (s[site, b, t] > 0)):
                        continue
                    informative += 1
                    idx = np.flatnonzero(a)
                    hits += idx[np.argmax(raw[site, b, t][idx])] == idx[np.argmin(
                        s[site, b, t][idx])]
        fired += np.sum(on[:, valid].any(axis=1))  # stacked layers: one neuron per site
    surprise = np.mean(s_all)
    assert informative > 0 and 0 < hits < informative
    np.testing.assert_allclose(float(m["train/surprise"]), surprise, rtol=1e-5)
    np.testing.assert_allclose(float(m["train/gating_acc"]), hits / informative, rtol=1e-6)
    np.testing.assert_allclose(float(m["train/avg_k"]), np.mean(k_sites), rtol=1e-5)
    assert int(m["spl/active_neurons"]) == fired
    pool = cfg.num_layers * (4 * 16 + 32 + 16)  # q, k, v, o: 16; ffn1: 32; ffn2: 16 neurons
    assert int(m["train/num_experts"]) == SPL.num_experts(_full(cfg)) == pool
    assert 0 < fired < pool
    ce, tau = float(m["train/main_loss"]), float(m["train/tau"])
    want_pi = float(metrics.pi_score(jnp.float32(ce), jnp.float32(tau), jnp.float32(surprise),
                                     cfg.pi_alpha, cfg.pi_gamma))  # the one formula
    np.testing.assert_allclose(float(m["train/pi_score"]), want_pi, rtol=1e-5)
    assert 0 < want_pi < 1
    assert float(m["train/main_acc"]) == float(m["train/token_acc"])
    np.testing.assert_allclose(float(m["train/gating_loss"]), float(
        cfg.w_proto * info["proto_loss"] + cfg.w_gate * info["gate_loss"]), rtol=1e-6)
    assert not any("sparsity" in name for name in m)
