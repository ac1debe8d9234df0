"""Invariants of the functional core (issue 2)."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from tinyonn_jax.config import Config, ModelConfig, apply_overrides
from tinyonn_jax.families.dyntrm import dynsiha, modules, recursion
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.nn import context, experts, routing, variables
from tinyonn_jax.nn.variables import MAIN, META

T = 6


def _setup(cfg, b=2, seed=0):
    params = modules.init_params(jax.random.key(seed), cfg)
    tokens = jax.random.randint(jax.random.key(seed + 1), (b, T), 0, cfg.vocab_size)
    return params, tokens


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("rope", ["none", "rope1d", "rope2d"])
@pytest.mark.parametrize("layout", ["latent_heads", "qkv_routers"])
def test_scan_equals_unrolled(jit, rope, layout):
    cfg = tiny_model_config(rope=rope, max_refinement_steps=3, attn_layout=layout)
    params, tokens = _setup(cfg)
    def fwd(p, t):
        return tr.forward(p, t, cfg)[0]

    logits = (jax.jit(fwd) if jit else fwd)(params, tokens)

    ctx = context.make_context(tokens, rope=rope)
    x = tr.embed(params, tokens, cfg)
    for _ in range(cfg.max_refinement_steps):  # the reference: a plain Python loop, not jitted
        x, _ = recursion.block_step(params["block"], x, None, ctx, cfg)
    _, ref = tr.make_readout(cfg)(params, x)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["latent_heads", "qkv_routers"])
def test_attention_is_causal(layout):
    tiny_cfg = tiny_model_config(attn_layout=layout)
    params, tokens = _setup(tiny_cfg, b=1)
    ctx = context.make_context(tokens)
    x0 = tr.embed(params, tokens, tiny_cfg)
    readout = tr.make_readout(tiny_cfg)

    def logits_from_x(x):
        return recursion.refine(params, x, ctx, tiny_cfg, None, readout)[1].logits[-1]

    jac = jax.jacrev(logits_from_x)(x0)  # (1,T,V, 1,T,D)
    dep = jnp.abs(jac).sum(axis=(2, 5))[0, :, 0, :]  # (T_out, T_in)
    later = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(np.asarray(dep)[later] == 0.0)
    assert np.all(np.asarray(dep)[~later] > 0.0)


@pytest.mark.parametrize("layout", ["latent_heads", "qkv_routers"])
def test_segments_do_not_attend_to_each_other(layout):
    tiny_cfg = tiny_model_config(attn_layout=layout, rope="rope1d")
    params, tokens = _setup(tiny_cfg, b=1)
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    pos = jnp.array([[0, 1, 2, 0, 1, 0]])
    logits, _ = tr.forward(params, tokens, tiny_cfg, positions=pos, segment_ids=seg)
    alone, _ = tr.forward(params, tokens[:, 3:5], tiny_cfg)
    np.testing.assert_allclose(logits[:, 3:5], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["capr", "topk", "dense"])
def test_routing_contract(mode):
    u = jax.random.normal(jax.random.key(0), (3, 5, 8))
    proto = jax.random.normal(jax.random.key(1), (6, 8))
    gate = 0.3 * jax.random.normal(jax.random.key(2), (6,))
    r = routing.route(u, proto, gate, mode, top_k=2)
    z, mask = np.asarray(r.z), np.asarray(r.mask)
    assert np.all(z >= 0)
    assert np.all(z[~mask] == 0.0)
    assert np.all(z[mask] > 0.0)
    np.testing.assert_array_equal(np.asarray(r.k), mask.sum(-1))
    scores = np.asarray(routing.prototype_scores(u, proto, gate))
    if mode == "capr":
        np.testing.assert_allclose(z, np.maximum(scores, 0.0), rtol=1e-6)
        assert 0 < mask.mean() < 1
    elif mode == "topk":
        assert np.all(mask.sum(-1) == 2)
        np.testing.assert_allclose(z.sum(-1), 1.0, rtol=1e-6)
        kth = np.sort(scores, -1)[..., -2:-1]
        assert np.all(scores[mask] >= np.broadcast_to(kth, scores.shape)[mask])
    else:
        np.testing.assert_allclose(z, 1.0 / 6)


def test_mas_divides_by_max_abs():
    v = jnp.array([[1.0, -4.0, 2.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(routing.mas(v), [[0.25, -1.0, 0.5], [0, 0, 0]], atol=1e-8)


def test_dense_composition_equals_per_expert_loop():
    bank = experts.init_bank(jax.random.key(0), 5, 4, 7, 3)
    u = jax.random.normal(jax.random.key(1), (2, 6, 4))
    z = jax.nn.relu(jax.random.normal(jax.random.key(2), (2, 6, 5)))
    out = experts.apply_dense(bank, u, z)
    w1, w2 = np.asarray(bank["w1"]), np.asarray(bank["w2"])
    un, zn = np.asarray(u), np.asarray(z)
    ref = np.zeros((2, 6, 3))
    for p in range(5):
        h = un @ w1[p]
        ref += zn[..., p:p + 1] * ((h / (1 + np.exp(-h))) @ w2[p])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_qkv_composition_matches_per_head_reference(tiny_cfg):
    params = variables.pure_params(modules.DynSiha(tiny_cfg, jax.random.key(0)))
    u = jax.random.normal(jax.random.key(1), (1, T, tiny_cfg.num_heads, tiny_cfg.head_dim))
    routes = dynsiha.route_attention(params, u, tiny_cfg)
    out = dynsiha.compose_qkv(params, u, {c: r.z for c, r in routes.items()}, None)
    for c in dynsiha.QKV:
        ref = experts.apply_dense(params["library"], u, routes[c].z)
        np.testing.assert_allclose(out[c], ref, rtol=1e-6, atol=1e-6)


def _loss(params, tokens, cfg):
    logits, _ = tr.forward(params, tokens, cfg)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
        logits, tokens[..., None], -1)[..., 0])


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_same_loss_and_grads(policy):
    cfg = tiny_model_config(remat="none")
    params, tokens = _setup(cfg)
    l0, g0 = jax.jit(jax.value_and_grad(_loss), static_argnums=2)(params, tokens, cfg)
    cfg_r = dataclasses.replace(cfg, remat=policy)
    l1, g1 = jax.jit(jax.value_and_grad(_loss), static_argnums=2)(params, tokens, cfg_r)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", ["latent_heads", "qkv_routers"])
def test_full_remat_saves_the_step_input_and_the_routing_masks_only(capsys, layout):
    """A rematerialised step keeps x and one bool mask per call site; the routing weights z,
    already returned for SARS, are recomputed from the masks instead of stored twice."""
    cfg = tiny_model_config(remat="full", hidden=32, num_attn_experts=6, num_ffn_experts=5,
                            attn_layout=layout)
    params, tokens = _setup(cfg)
    x = tr.embed(params, tokens, cfg)
    ctx = context.make_context(tokens)
    step = recursion.remat_body(
        lambda x: recursion.block_step(params["block"], x, None, ctx, cfg), cfg.remat)
    jax.ad_checkpoint.print_saved_residuals(lambda x: jnp.sum(step(x)[0]), x)
    saved = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    b, t = tokens.shape
    masks = [s for s in saved if "named 'routing'" in s]
    attn_masks = ([f"bool[{b},{t},6]"] if layout == "latent_heads"  # one router: attn
                  else [f"bool[{b},{t},{cfg.num_heads},6]"] * 3)  # q, k, v per head
    assert sorted(s.split()[0] for s in masks) == sorted(attn_masks + [f"bool[{b},{t},5]"])
    activations = [s for s in saved if "named 'routing'" not in s and "constant" not in s]
    assert [s.split()[0] for s in activations] == [f"f32[{b},{t},32]"]  # x itself


@pytest.mark.parametrize("jit", [False, True])
def test_halting_threshold_extremes(tiny_cfg, jit):
    cfg = dataclasses.replace(tiny_cfg, max_refinement_steps=4)
    params, tokens = _setup(cfg)
    run = lambda thr: tr.forward_adaptive(params, tokens, cfg, threshold=thr)  # noqa: E731
    if jit:
        run = jax.jit(run)
    logits0, steps0 = run(0.0)
    logits_n, steps_n = run(1.5)
    assert np.all(np.asarray(steps0) == 1)
    assert np.all(np.asarray(steps_n) == cfg.max_refinement_steps)
    full, aux = tr.forward(params, tokens, cfg)
    np.testing.assert_allclose(logits_n, full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits0, aux.steps.logits[0], rtol=1e-5, atol=1e-5)


def test_halting_freezes_finished_rows(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, max_refinement_steps=4)
    params, tokens = _setup(cfg)
    _, aux = tr.forward(params, tokens, cfg)
    # Point the halting head along the difference of the two rows' pooled states after step 1,
    # so row 0 halts at once and row 1 continues.
    h, _ = tr.make_readout(cfg)(params, aux.steps.hidden[0])
    pooled = np.asarray(h.mean(axis=1))
    d = pooled[0] - pooled[1]
    c = 50.0 / float(d @ d)
    params["halt"]["w"] = jnp.stack([jnp.asarray(c * d), jnp.zeros_like(d)], axis=1)
    params["halt"]["b"] = jnp.array([-c * float(d @ (pooled[0] + pooled[1])) / 2, 0.0])
    logits, steps = tr.forward_adaptive(params, tokens, cfg, threshold=0.5)
    steps = np.asarray(steps)
    assert steps[0] == 1 and steps[1] > 1
    _, aux = tr.forward(params, tokens, cfg)
    for row in range(2):
        np.testing.assert_allclose(logits[row], aux.steps.logits[steps[row] - 1, row],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["latent_heads", "qkv_routers"])
def test_param_labels_cover_every_leaf_once(layout):
    cfg = tiny_model_config(attn_layout=layout)
    params = modules.init_params(jax.random.key(0), cfg)
    labels = modules.param_labels(cfg)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    assert {lab for _, lab in flat} == {MAIN, META}
    meta_names = sorted(jax.tree_util.keystr(p) for p, lab in flat if lab == META)
    sites = ("attn",) if layout == "latent_heads" else tuple("qkv")
    assert meta_names == sorted(
        [f"['block']['attn']['{k}_{c}']" for k in ("gate", "proto") for c in sites]
        + ["['block']['ffn']['gate']", "['block']['ffn']['proto']"])


@pytest.mark.parametrize("field,value", [
    ("hidden", 0), ("num_heads", 3), ("attn_routing", "softmax"), ("rope", "3d"),
    ("max_refinement_steps", -1), ("remat", "everything"), ("ln_eps", 0.0),
    ("attn_capacity_frac", 1.5), ("attn_layout", "heads"), ("attn_dispatch", "sparse"),
])
def test_bad_model_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_topk_larger_than_pool_raises():
    with pytest.raises(ValueError, match="ffn_top_k"):
        ModelConfig(ffn_routing="topk", ffn_top_k=17)


def test_overrides_validate_and_reject_unknown_keys():
    cfg = apply_overrides(Config(), ["model.hidden=64", "model.num_heads=4", "train.num_steps=3"])
    assert cfg.model.hidden == 64 and cfg.train.num_steps == 3
    with pytest.raises(ValueError, match="unknown config key 'model.hiden'"):
        apply_overrides(cfg, ["model.hiden=3"])
    with pytest.raises(ValueError, match="num_heads"):
        apply_overrides(cfg, ["model.num_heads=5"])
