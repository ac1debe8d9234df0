"""SPL family (issue 6, seed 001): SPL layer, PRC, M-SAPS statistics against brute force."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import packed_batch
from flax import nnx

from tinyonn_jax.config import Config, OptimizerConfig
from tinyonn_jax.families.spl import model as spl
from tinyonn_jax.families.spl import modules as sm
from tinyonn_jax.families.spl import msaps as ms
from tinyonn_jax.families.spl import step as ss
from tinyonn_jax.families.spl.family import SPL
from tinyonn_jax.nn import variables
from tinyonn_jax.nn.variables import MAIN, META

B, T = 2, 8


def _cfg(**kw) -> spl.SplConfig:
    """hidden 16, 2 layers (or 3 steps): the brute-force size. Tests share three variants (one
    compilation each): the default (stacked, STE, linear, PRC), ``_DYN`` and ``_NO_PRC``."""
    base = dict(hidden=16, num_layers=2, steps=3, moie_mult=2, init_std=0.5)
    base.update(kw)
    return spl.SplConfig(**base)


_DYN = _cfg(recursion="dyntrm", activation="silu", mask_mode="hard")
_NO_PRC = _cfg(prc=False, mask_mode="hard")  # row-separable prototype loss per layer


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(np.abs(b).max(), 1e-12))


# Compiled once per config and shared by the tests (compilation dominates their run time).
_gradients_fn = jax.jit(ss.spl_gradients, static_argnums=3)


def _gradients(params, batch, cfg, ema=0.0):
    """spl_gradients with zero probes: out has g_ce (jax.grad of the main loss), g_probes
    (dL/dM per site) and aux.residuals."""
    probes = spl.spl_zero_probes(cfg, *batch["inputs"].shape)
    return _gradients_fn(params, batch, jnp.float32(ema), cfg, probes)


def _full(cfg) -> Config:
    """The whole config of the SPL family with ``cfg`` as its model: plain SGD, main lr 0.1,
    meta lr 0.5."""
    return Config(family="spl", model=cfg,
                  optim=OptimizerConfig(name="sgd", learning_rate=0.1, kwargs=()),
                  meta_optim=OptimizerConfig(name="sgd", learning_rate=0.5, kwargs=()))


@functools.cache
def _sgd_step(cfg):
    """(optimizer, jitted step) of the SPL family with the optimizers of ``_full``."""
    opt = SPL.build_optimizer(_full(cfg))
    return opt, SPL.make_train_step(_full(cfg), opt, donate=False)


def _layer_params(seed=0, d_in=6, n=5):
    layer = sm.SplLayer(jax.random.key(seed)[None], d_in, n, init_std=0.5)  # L = 1
    p = {name: a[0] for name, a in variables.pure_params(layer).items()}
    p["gate_param"] = 0.2 * jax.random.normal(jax.random.key(seed + 1), (n, d_in))
    p["mu_bias"] = 0.1 * jax.random.normal(jax.random.key(seed + 2), (n,))
    x = jax.random.normal(jax.random.key(seed + 3), (7, d_in))
    return p, x


def _np_route(p, x):
    x, pw, g = (np.asarray(a, np.float64) for a in (x, p["proto_weight"], p["gate_param"]))
    xn = np.linalg.norm(x, axis=-1, keepdims=True)
    pn = np.linalg.norm(pw, axis=-1, keepdims=True)
    cos = (x / xn) @ (pw / pn).T
    s = cos - x @ g.T
    return x, xn, pw, pn, cos, s


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mask_mode"):
        spl.SplConfig(mask_mode="soft")
    with pytest.raises(ValueError, match="hidden"):
        spl.SplConfig(hidden=0)
    with pytest.raises(ValueError, match="recursion"):
        spl.SplConfig(recursion="loop")


_SPL_LEAVES = ("mu_weight", "mu_bias", "proto_weight", "gate_param")  # per-neuron: N on axis 1


def _reference_params(key, cfg) -> dict:
    """The SPL init written out layer by layer with plain jax.random (no modules, no vmap)."""
    k_emb, k_layers, k_prc, k_head = jax.random.split(key, 4)
    d, v, f32 = cfg.hidden, cfg.vocab_size, jnp.float32
    norm = lambda *s: {"scale": jnp.ones(s + (d,), f32), "bias": jnp.zeros(s + (d,), f32)}  # noqa: E731
    per_layer = []
    for kl in jax.random.split(k_layers, cfg.num_param_layers):
        lp = {"ln1": norm(), **({"ln2": norm()} if cfg.use_moie else {})}
        for kind, kk in zip(cfg.kinds, jax.random.split(kl, len(cfg.kinds)), strict=True):
            (d_in, n), (k_mu, k_p) = cfg.dims(kind), jax.random.split(kk)
            lp[kind] = {"mu_weight": jax.random.normal(k_mu, (n, d_in)) / np.sqrt(d_in),
                        "mu_bias": jnp.zeros((n,), f32),
                        "proto_weight": cfg.init_std * jax.random.normal(k_p, (n, d_in)),
                        "gate_param": jnp.zeros((n, d_in), f32)}
        per_layer.append(lp)
    want = {"embed": cfg.init_std * jax.random.normal(k_emb, (v, d)),
            "layers": jax.tree.map(lambda *a: jnp.stack(a), *per_layer),
            "lm_head": jax.random.normal(k_head, (d, v)) / np.sqrt(d)}
    if cfg.num_prc:
        want["prc"] = {
            kind: {"prc_weight": jax.random.normal(kk, (cfg.num_prc, i, i)) / np.sqrt(i),
                   "prc_scale": jnp.full((cfg.num_prc, i), cfg.init_std, f32),
                   "prc_bias": jnp.zeros((cfg.num_prc, i), f32)}
            for kind, kk in zip(cfg.kinds, jax.random.split(k_prc, len(cfg.kinds)), strict=True)
            for i in [cfg.dims(kind)[0]]}
    if cfg.final_norm:
        want["final_ln"] = norm()
    return want


def _assert_trees_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        assert a.dtype == b.dtype == jnp.float32 and a.shape == b.shape, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


@pytest.mark.parametrize("cfg", [_cfg(), _DYN, _NO_PRC, _cfg(use_moie=False, final_norm=False)],
                         ids=["stacked", "dyntrm", "no_prc", "no_moie"])
def test_module_params_equal_reference_init_and_groups_are_types(cfg):
    model = sm.SplModel(cfg, jax.random.key(3))
    params = variables.pure_params(model)
    _assert_trees_identical(params, _reference_params(jax.random.key(3), cfg))
    _assert_trees_identical(sm.init_spl_params(jax.random.key(3), cfg), params)  # deterministic
    assert not np.array_equal(sm.init_spl_params(jax.random.key(4), cfg)["embed"], params["embed"])
    assert ("prc" in params) == bool(cfg.num_prc) and ("final_ln" in params) == cfg.final_norm
    assert ("ln2" in params["layers"]) == cfg.use_moie
    labels = sm.param_labels(cfg)
    assert labels == variables.labels(model)  # the shape-only model has the same types
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    for path, lab in jax.tree_util.tree_leaves_with_path(labels):
        keys = [p.key for p in path]
        is_meta = keys[0] == "prc" or keys[-1] in ("proto_weight", "gate_param")
        assert lab == (META if is_meta else MAIN), keys
    for kind in cfg.kinds:
        assert isinstance(getattr(model.layers, kind).mu_weight, variables.MainParam)
        assert isinstance(getattr(model.layers, kind).proto_weight, variables.MetaParam)
    if cfg.num_prc:
        prc_vars = nnx.to_flat_state(nnx.state(model.prc, nnx.Param))
        assert {type(var) for _, var in prc_vars} == {variables.MetaParam}


def test_module_call_equals_spl_forward():
    cfg, batch = _DYN, packed_batch()
    model = sm.SplModel(cfg, jax.random.key(5))
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    logits = model(batch["inputs"], **kw)
    want, aux = spl.spl_forward(variables.pure_params(model), batch["inputs"], cfg,
                                with_stats=False, **kw)
    assert aux.stats is None and aux.residuals is None  # no statistics, no probes
    assert logits.shape == (B, T, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(want))


def test_labels_follow_types_not_names():
    model = sm.SplModel(_NO_PRC, jax.random.key(0))
    q = model.layers.q
    # A meta leaf under a computation-like name, a main leaf under a prototype-like name.
    q.mu_weight2 = variables.meta(q.mu_weight[...])
    q.proto_x = variables.main(q.proto_weight[...])
    del q.mu_weight, q.proto_weight
    model.prc_like = variables.main(jnp.ones((3,)))
    labels, params = variables.labels(model), variables.pure_params(model)
    assert labels["layers"]["q"]["mu_weight2"] == META
    assert labels["layers"]["q"]["proto_x"] == MAIN
    assert labels["prc_like"] == MAIN
    assert "mu_weight" not in labels["layers"]["q"] and "proto_weight" not in labels["layers"]["q"]
    # The optimizer partition follows the labels: only meta leaves move under (main 0, meta 1).
    opt = optax.partition({MAIN: optax.sgd(0.0), META: optax.sgd(1.0)}, labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert np.all(np.asarray(updates["layers"]["q"]["mu_weight2"]) == -1.0)
    assert np.all(np.asarray(updates["layers"]["q"]["proto_x"]) == 0.0)
    assert np.all(np.asarray(updates["prc_like"]) == 0.0)


@pytest.mark.parametrize("cfg", [_cfg(), _DYN], ids=["stacked", "dyntrm"])
def test_expert_axes_mark_exactly_the_per_neuron_leaves(cfg):
    axes, params = sm.expert_axes(cfg), sm.init_spl_params(jax.random.key(0), cfg)
    assert axes is sm.expert_axes(cfg)  # cached per config
    assert jax.tree.structure(axes) == jax.tree.structure(params)
    marked = 0
    for (path, ax), a in zip(jax.tree_util.tree_leaves_with_path(axes), jax.tree.leaves(params),
                             strict=True):
        keys = [p.key for p in path]
        if keys[0] == "layers" and keys[1] in cfg.kinds:
            assert keys[2] in _SPL_LEAVES and ax == 1, keys
            assert a.shape[:2] == (cfg.num_param_layers, cfg.dims(keys[1])[1]), keys  # (L_p, N)
            marked += 1
        else:
            assert ax == -1, keys
    assert marked == len(cfg.kinds) * len(_SPL_LEAVES)


@pytest.mark.parametrize("activation", ["linear", "silu"])
def test_spl_forward_equals_numpy_formula(activation):
    p, x = _layer_params()
    xd, _, _, _, _, s = _np_route(p, x)
    mask = (s > 0).astype(np.float64)
    assert 0 < mask.mean() < 1
    pre = xd @ np.asarray(p["mu_weight"], np.float64).T + np.asarray(p["mu_bias"])
    act = pre if activation == "linear" else pre / (1 + np.exp(-pre))
    outs = [spl.spl_apply(p, x, mode, activation=activation)[0] for mode in ("hard", "ste")]
    _close(outs[0], act * mask)
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))  # same forward


def test_routing_gradients_hard_zero_ste_identity():
    p, x = _layer_params(seed=3)
    r = jax.random.normal(jax.random.key(9), (7, 5))

    def loss(params, mode):
        return jnp.sum(spl.spl_apply(params, x, mode)[0] * r)

    g_hard, g_ste = jax.grad(loss)(p, "hard"), jax.grad(loss)(p, "ste")
    for k in ("proto_weight", "gate_param"):
        assert np.all(np.asarray(g_hard[k]) == 0)
    _close(g_hard["mu_weight"], g_ste["mu_weight"])
    # Identity STE: dL/ds = dL/dmask * relu'(s), with dL/dmask = pre * r.
    xd, xn, pw, pn, cos, s = _np_route(p, x)
    pre = xd @ np.asarray(p["mu_weight"], np.float64).T + np.asarray(p["mu_bias"])
    c = pre * np.asarray(r) * (s > 0)  # (T, N)
    _close(g_ste["gate_param"], -c.T @ xd)
    # d cos(x, p_j) / d p_j = x_hat / ||p_j|| - cos * p_j / ||p_j||^2
    dp = (c.T @ (xd / xn)) / pn - np.sum(c * cos, 0)[:, None] * pw / pn**2
    _close(g_ste["proto_weight"], dp, rtol=1e-4)
    assert np.abs(dp).max() > 0


def test_anchors_and_counts_equal_direct_masked_mean():
    cfg, batch = _cfg(), packed_batch()
    params = sm.init_spl_params(jax.random.key(0), cfg)
    aux = _gradients(params, batch, cfg)[3]["aux"]
    assert isinstance(aux, spl.Aux) and set(aux.stats) == set(aux.residuals) == set(cfg.kinds)
    assert float(aux.tokens) == float(np.sum(np.asarray(batch["segment_ids"]) > 0))
    valid = np.asarray(batch["segment_ids"] > 0, np.float64)
    for k in cfg.kinds:
        x = np.asarray(aux.residuals[k].x, np.float64)
        m = np.asarray(aux.residuals[k].mask, np.float64) * valid[None, ..., None]
        assert x.shape == (cfg.num_sites, B, T, cfg.dims(k)[0])
        assert m.shape == aux.residuals[k].pre.shape == aux.residuals[k].raw.shape
        assert aux.protos[k].shape == aux.stats[k].anchor.shape
        for site in range(cfg.num_sites):
            for j in range(m.shape[-1]):
                sel = m[site, ..., j] > 0
                got = np.asarray(aux.stats[k].anchor[site, j])
                want = x[site][sel].mean(0) if sel.any() else np.zeros(x.shape[-1])
                _close(got, want)
        _close(aux.stats[k].count, m.sum((1, 2)))
        _close(aux.stats[k].x_mean, (x * valid[None, ..., None]).sum((1, 2)) / valid.sum())
    # The first module sees LN1(embed) of the tokens, computed here independently.
    e = np.asarray(params["embed"], np.float64)[np.asarray(batch["inputs"])]
    ln = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + cfg.ln_eps)
    _close(aux.residuals["q"].x[0], ln, rtol=1e-4)


@pytest.mark.parametrize("cfg", [_cfg(), _DYN], ids=["stacked", "dyntrm"])
def test_mu_surprise_equals_jax_grad(cfg):
    batch = packed_batch()
    params = sm.init_spl_params(jax.random.key(1), cfg)
    out = _gradients(params, batch, cfg)[3]
    aux, gp, gprobe = out["aux"], out["g_ce"], out["g_probes"]
    for k in cfg.kinds:
        site = ms.site_mu_grads(aux.residuals[k], gprobe[k], cfg.activation)
        for leaf in ("mu_weight", "mu_bias"):  # per-site closed forms add up to jax.grad
            _close(ms.to_param_layers(site[leaf], cfg.num_param_layers), gp["layers"][k][leaf])
        want = np.linalg.norm(np.asarray(gp["layers"][k]["mu_weight"], np.float64), axis=-1)
        _close(out["info"]["mu_surprise"][k], want)
        assert want.max() > 0


def _brute_proto_loss(params, cfg, anchors, site_active, signs, weights):
    """L_proto written out: PRC per layer with an explicit LayerNorm, then the mean."""
    total = 0.0
    for k in cfg.kinds:
        protos = [params["layers"][k]["proto_weight"][0]]
        for layer in range(1, cfg.num_sites):
            y = protos[-1] @ params["prc"][k]["prc_weight"][layer - 1].T
            mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
            ln = ((y - mu) / jnp.sqrt(var + cfg.ln_eps) * params["prc"][k]["prc_scale"][layer - 1]
                  + params["prc"][k]["prc_bias"][layer - 1])
            protos.append(params["layers"][k]["proto_weight"][layer] + ln)
        p = jnp.stack(protos)
        cos = jnp.sum(p * anchors[k], -1) / (jnp.linalg.norm(p, axis=-1)
                                              * jnp.linalg.norm(anchors[k], axis=-1) + 1e-30)
        sel = site_active[k] & (signs[k] != 0)
        terms = jnp.where(sel, signs[k] * weights[k] * cos, 0.0)
        total = total + jnp.sum(terms) / jnp.maximum(jnp.sum(sel), 1)
    return total


def test_classification_and_proto_surprise_equal_brute_force():
    cfg, batch = _cfg(), packed_batch(seed=2)
    params = sm.init_spl_params(jax.random.key(2), cfg)
    out = _gradients(params, batch, cfg)[3]
    aux, gp, info = out["aux"], out["g_ce"], out["info"]
    valid = np.asarray(batch["segment_ids"] > 0, np.float64)
    anchors, site_active, signs, weights = {}, {}, {}, {}
    n_judged = 0
    for k in cfg.kinds:
        mu_s = np.linalg.norm(np.asarray(gp["layers"][k]["mu_weight"], np.float64), axis=-1)
        m = np.asarray(aux.residuals[k].mask, np.float64) * valid[None, ..., None]
        x = np.asarray(aux.residuals[k].x, np.float64)
        count = m.sum((1, 2))  # (L, N)
        good, bad = np.zeros(count.shape, bool), np.zeros(count.shape, bool)
        for layer in range(cfg.num_sites):
            rate = count[layer].sum() / (valid.sum() * count.shape[-1])
            act = count[layer] > 0
            lo = np.quantile(mu_s[layer][act], rate)
            hi = np.quantile(mu_s[layer][act], 1 - rate)
            bad[layer] = act & (mu_s[layer] >= hi * (1 - 1e-6))
            good[layer] = act & (mu_s[layer] <= lo * (1 + 1e-6)) & ~bad[layer]
        np.testing.assert_array_equal(np.asarray(info["good"][k]), good)
        np.testing.assert_array_equal(np.asarray(info["bad"][k]), bad)
        assert not np.any((good | bad) & (count == 0))  # inactive neurons are never judged
        n_judged += good.sum() + bad.sum()
        anc = np.einsum("lbtn,lbti->lni", m, x) / np.maximum(count, 1)[..., None]
        anc[count == 0] = 1.0  # never used (not judged), but keeps the norm's gradient finite
        anchors[k] = jnp.asarray(anc, jnp.float32)
        site_active[k] = jnp.asarray(count > 0)
        signs[k] = jnp.asarray(np.where(good, -1.0, np.where(bad, 1.0, 0.0)), jnp.float32)
        weights[k] = jnp.asarray(mu_s, jnp.float32)
    assert n_judged > 0
    brute = jax.jit(jax.value_and_grad(_brute_proto_loss), static_argnums=1)
    l_b, g_b = brute(params, cfg, anchors, site_active, signs, weights)
    _close(info["proto_loss"], l_b, rtol=1e-4)
    for k in cfg.kinds:
        want = np.linalg.norm(np.asarray(g_b["layers"][k]["proto_weight"], np.float64), axis=-1)
        _close(info["proto_surprise"][k], want, rtol=1e-4)
        assert want.max() > 0


def test_meta_step_pulls_good_and_pushes_bad():
    cfg, batch = _NO_PRC, packed_batch(seed=3)
    opt, step = _sgd_step(cfg)
    state = SPL.init_state(_full(cfg), opt, jax.random.key(3))
    out = _gradients(state.params, batch, cfg)[3]
    info, stats = out["info"], out["aux"].stats
    new, _ = step(state, batch)
    moved = {"good": 0, "bad": 0}
    for k in cfg.kinds:
        a = stats[k].anchor
        before = np.asarray(ms.cosine(state.params["layers"][k]["proto_weight"], a))
        after = np.asarray(ms.cosine(new.params["layers"][k]["proto_weight"], a))
        live = np.asarray(info["mu_surprise"][k]) > 1e-6
        good, bad = np.asarray(info["good"][k]), np.asarray(info["bad"][k])
        assert np.all(after[good & live] > before[good & live])
        assert np.all(after[bad & live] < before[bad & live])
        moved["good"] += int(np.sum(good & live))
        moved["bad"] += int(np.sum(bad & live))
    assert moved["good"] > 0 and moved["bad"] > 0


@pytest.mark.parametrize("rule", ["seed", "original"])
def test_protection_freezes_a_fully_protected_prototype(rule):
    cfg, batch = dataclasses.replace(_NO_PRC, protection=rule), packed_batch(seed=4)
    opt, step = _sgd_step(cfg)
    state = SPL.init_state(_full(cfg), opt, jax.random.key(4))
    layers = dict(state.params["layers"])
    for i, k in enumerate(cfg.kinds):  # every gate row has norm 2 ...
        g = jax.random.normal(jax.random.key(40 + i), layers[k]["gate_param"].shape)
        g = 2.0 * g / jnp.linalg.norm(g, axis=-1, keepdims=True)
        if k == "q":
            g = g.at[0, 0].set(0.0)  # ... except one: the unique top of -||g||
        layers[k] = {**layers[k], "gate_param": g}
    state = state._replace(params={**state.params, "layers": layers}, extras=jnp.float32(1.0))
    new, m = step(state, batch)
    assert float(m["train/update_ok"]) == 1.0 and float(m["spl/protection_max"]) == 1.0
    old_p, new_p = state.params["layers"]["q"]["proto_weight"], new.params["layers"]["q"][
        "proto_weight"]
    np.testing.assert_array_equal(np.asarray(new_p[0, 0]), np.asarray(old_p[0, 0]))
    assert np.all(np.any(np.asarray(new_p[0, 1:] != old_p[0, 1:]), axis=-1))


@pytest.mark.parametrize("cfg", [_cfg(), _DYN], ids=["stacked", "dyntrm"])
def test_prc_is_meta_and_receives_gradient(cfg):
    batch = packed_batch()
    params = sm.init_spl_params(jax.random.key(5), cfg)
    labels = sm.param_labels(cfg)
    assert set(jax.tree.leaves(labels["prc"])) == {META}
    assert labels["layers"]["q"]["mu_weight"] == MAIN
    g_main, g_meta, _, _ = _gradients(params, batch, cfg)
    for k in cfg.kinds:
        for name, g in g_meta["prc"][k].items():
            assert float(jnp.linalg.norm(g)) > 0, (k, name)
            assert float(jnp.linalg.norm(g_main["prc"][k][name])) == 0, (k, name)


def test_packed_sequences_equal_separate_rows():
    cfg, toks = _DYN, packed_batch()["inputs"][0]
    params = sm.init_spl_params(jax.random.key(6), cfg)
    # Row 0 packs a 5- and a 3-token sequence; rows 1 and 2 hold each one alone, padded.
    inputs = jnp.stack([toks, jnp.pad(toks[:5], (0, 3)), jnp.pad(toks[5:], (0, 5))])
    seg = jnp.array([[1] * 5 + [2] * 3, [1] * 5 + [0] * 3, [1] * 3 + [0] * 5], jnp.int32)
    pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2], list(range(8)), list(range(8))], jnp.int32)
    fwd = jax.jit(lambda p, x, s, q: spl.spl_forward(p, x, cfg, positions=q, segment_ids=s,
                                                      with_stats=False)[0])
    logits = fwd(params, inputs, seg, pos)
    _close(logits[0, :5], logits[1, :5], rtol=1e-4)
    _close(logits[0, 5:], logits[2, :3], rtol=1e-4)


def test_tiny_model_loss_falls_and_non_finite_is_skipped():
    cfg, batch = _NO_PRC, packed_batch(seed=7)
    opt, step = _sgd_step(cfg)
    state = SPL.init_state(_full(cfg), opt, jax.random.key(7))
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["train/main_loss"]))
    assert int(state.skipped) == 0 and np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert m["experts/usage_ffn1"].shape == (cfg.dims("ffn1")[1],)
    assert 0.0 < float(m["spl/activation_rate"]) < 1.0
    assert 0.0 < float(m["spl/good_share"]) and 0.0 < float(m["spl/bad_share"])
    assert float(state.extras) > 0  # the accuracy EMA
    bad = state._replace(params={**state.params, "lm_head": state.params["lm_head"] * jnp.nan})
    kept = jax.tree.map(np.asarray, bad.params)
    bad, m = step(bad, batch)
    assert int(bad.skipped) == 1 and float(m["train/update_ok"]) == 0.0
    np.testing.assert_array_equal(np.asarray(bad.params["embed"]), kept["embed"])


def test_adaptive_l2_lambda_is_detached():
    cfg = _cfg()
    params = sm.init_spl_params(jax.random.key(8), cfg)
    g = jax.jit(jax.grad(lambda p: ms.adaptive_l2(p["layers"], cfg.kinds, cfg.l2_coef)[0]))(params)
    _, lam = ms.adaptive_l2(params["layers"], cfg.kinds, cfg.l2_coef)
    for k in cfg.kinds:
        for n in ("mu_weight", "proto_weight"):
            _close(g["layers"][k][n], 2 * lam * params["layers"][k][n])
    assert optax.tree.norm(g["layers"]["q"]["gate_param"]) == 0
