"""DynSIHA+ in the latent-head layout of seed 000 section 2.1 (attn_layout="latent_heads").

The forward against a per-head reference, routing (top-k / dynamic K / dense, live mask), and the
SARS closed forms of ``sars/heads.py`` against brute force: ``jax.grad`` per (query token, head)
of ``<g_t, z_tp y_tp>`` with respect to head p's parameters, with and without RoPE, with padding
and packed segments, alone and inside the model (probe cotangents of every refinement step).
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from tinyonn_jax import loss as task_loss
from tinyonn_jax.config import Config, ModelConfig, OptimizerConfig
from tinyonn_jax.errors import ConfigError
from tinyonn_jax.families.dyntrm import latent_heads, modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.family import DYNTRM
from tinyonn_jax.families.dyntrm.sars import engine, heads, surprise
from tinyonn_jax.families.dyntrm.sars import losses as meta_losses
from tinyonn_jax.nn import attention, routing
from tinyonn_jax.nn.variables import META

B, T, D, P, DH = 2, 7, 8, 3, 4
# Row 0: two packed sequences and a padding slot (positions restart per sequence); row 1: one.
SEG = jnp.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]], jnp.int32)
POS = jnp.array([[0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 6]], jnp.int32)
ROPE_BASES = [None, 10000.0, 3.0]  # 3.0: large angles, so every rotation pair matters
# Grid coordinates (grid, row, column) per token, as rope="rope2d" rotates by.
POS3 = jnp.stack([jnp.array([[0, 1, 1, 0, 1, 1, 0], [1, 1, 1, 2, 2, 2, 2]]),
                  jnp.array([[0, 0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1, 1]]),
                  jnp.array([[0, 0, 0, 0, 0, 1, 0], [0, 1, 0, 0, 1, 0, 1]])], axis=-1)


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def _random_heads(seed=0):
    ks = jax.random.split(jax.random.key(seed), 7)
    hp = {"wq": jax.random.normal(ks[0], (P, D, DH)), "wk": jax.random.normal(ks[1], (P, D, DH)),
          "wv": jax.random.normal(ks[2], (P, D, DH)), "wo": jax.random.normal(ks[3], (P, DH, D))}
    x = jax.random.normal(ks[4], (B, T, D))
    z = jax.nn.relu(jax.random.normal(ks[5], (B, T, P)))
    g = jax.random.normal(ks[6], (B, T, D))
    return hp, x, z, g


def _one_head_share(w, x, z_tp, g_t, positions, segment_ids, t, rope_base):
    """``<g_t, z_tp y_tp>`` of one head (w: its wq, wk, wv (D,Dh), wo (Dh,D)) on one row x (T,D),
    written from the definition: single-head causal segment-local attention."""
    q, k, v = x @ w["wq"], x @ w["wk"], x @ w["wv"]
    if rope_base is not None:
        rot = lambda a: attention.rope(a[None, :, None], positions[None], rope_base)[0, :, 0]  # noqa: E731
        q, k = rot(q), rot(k)
    n = x.shape[0]
    allowed = (jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]) & (
        segment_ids[:, None] == segment_ids[None, :])
    logits = jnp.where(allowed, q @ k.T / jnp.sqrt(jnp.float32(q.shape[-1])),
                       jnp.finfo(jnp.float32).min)
    y_t = (jax.nn.softmax(logits, axis=-1) @ v)[t] @ w["wo"]
    return z_tp * jnp.dot(g_t, y_t)


def _brute_force(hp, x, z, g, positions, segment_ids, rope_base):
    """Per (b, t, p): the share f and its gradient w.r.t. head p's parameters, by ``jax.grad``
    (vmapped over every (row, query token, head) triple). Returns f (B,T,P), grads {w: (B,T,P,..)}.
    """
    b, t, p = (a.ravel() for a in jnp.meshgrid(jnp.arange(x.shape[0]), jnp.arange(x.shape[1]),
                                               jnp.arange(z.shape[-1]), indexing="ij"))

    def share(bi, ti, pi):
        w = {n: hp[n][pi] for n in latent_heads.HEAD_WEIGHTS}
        return jax.value_and_grad(_one_head_share)(w, x[bi], z[bi, ti, pi], g[bi, ti],
                                                   positions[bi], segment_ids[bi], ti, rope_base)

    f, grads = jax.vmap(share)(b, t, p)
    lead = z.shape
    return f.reshape(lead), {n: v.reshape(*lead, *v.shape[1:]) for n, v in grads.items()}


def _frob(a):
    return jnp.sqrt(jnp.sum(jnp.square(a), axis=(-1, -2)))


@pytest.mark.parametrize("rope_base,pos", [(b, POS) for b in ROPE_BASES] + [(3.0, POS3)])
def test_per_token_head_statistics_equal_brute_force(rope_base, pos):
    hp, x, z, g = _random_heads()
    f, grads = _brute_force(hp, x, z, g, pos, SEG, rope_base)
    got = heads.token_grad_norms(hp, x, z, g, pos, SEG, rope_base)
    for name, w in (("c_q", "wq"), ("c_k", "wk"), ("c_v", "wv"), ("c_o", "wo")):
        _close(getattr(got, name), _frob(grads[w]))
        assert float(jnp.max(_frob(grads[w]))) > 0  # nothing trivially zero
    _close(got.attribution, f)
    # Heads in groups (lax.map over groups of heads, as for long sequences) give the same.
    grouped = heads.token_grad_norms(hp, x, z, g, pos, SEG, rope_base, max_elems=1)
    for a, b in zip(grouped, got, strict=True):
        _close(a, b)
    # Assembled: C over all four matrices, O = |attribution|, goodness from them.
    cfg = tiny_model_config(hidden=D, num_heads=D // DH, num_attn_experts=P,
                            rope="none" if rope_base is None else "rope1d",
                            rope_base=rope_base or 10000.0)
    st = surprise.head_token_stats(hp, x, z, g, pos, SEG, cfg, "attribution")
    _close(st.c, jnp.sqrt(sum(_frob(grads[w]) ** 2 for w in latent_heads.HEAD_WEIGHTS)))
    _close(st.o, jnp.abs(f))
    np.testing.assert_allclose(st.goodness, surprise.goodness(st.o, z, st.c), atol=1e-6)


@pytest.mark.parametrize("rope_base,pos", [(b, POS) for b in ROPE_BASES] + [(3.0, POS3)])
def test_per_head_site_gradient_equals_brute_force(rope_base, pos):
    hp, x, z, g = _random_heads(1)
    _, grads = _brute_force(hp, x, z, g, pos, SEG, rope_base)
    got = heads.site_head_grads(hp, x, z, g, pos, SEG, rope_base)
    for w in latent_heads.HEAD_WEIGHTS:
        _close(got[w], grads[w].sum(axis=(0, 1)))  # the per-token gradients summed over tokens


def _model_cfg(rope, routing_mode="capr"):
    return tiny_model_config(rope=rope, attn_routing=routing_mode, rope_base=5.0,
                             max_refinement_steps=2)


def _model_data(cfg, seed=0):
    params = modules.init_params(jax.random.key(seed), cfg)
    toks = jax.random.randint(jax.random.key(seed + 3), (B, T + 1), 0, cfg.vocab_size)
    w = (SEG > 0).astype(jnp.float32).at[:, 0].set(0.0)
    return params, toks[:, :-1], toks[:, 1:], w


@pytest.mark.parametrize("rope,routing_mode", [("none", "capr"), ("rope1d", "capr"),
                                               ("rope1d", "topk"), ("rope2d", "capr")])
def test_model_statistics_and_total_gradient_equal_brute_force(rope, routing_mode):
    """Inside the model: the statistics of every step from the probes' cotangents equal the
    per-(token, head) brute force on that step's x_n, and the per-head site gradients summed
    over steps are ``jax.grad`` of the loss w.r.t. the stacked heads."""
    cfg = _model_cfg(rope, routing_mode)
    params, inputs, targets, w = _model_data(cfg)
    probes = tr.zero_probes(cfg, B, T)

    def loss(p, pr):
        logits, aux = tr.forward(p, inputs, cfg, positions=POS, segment_ids=SEG, probes=pr)
        return task_loss.cross_entropy(logits, targets, w), aux

    (_, aux), (g_params, g_probes) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        params, probes)
    assert aux.steps.u_attn is None and aux.steps.q is None  # the other layout's fields
    stats = surprise.all_site_stats(params, aux, g_probes, cfg)
    attn = params["block"]["attn"]
    base = cfg.rope_base if rope != "none" else None
    pos = aux.context.positions  # what the model rotated by: 1D positions or grid coordinates
    total = {n: jnp.zeros_like(attn[n]) for n in latent_heads.HEAD_WEIGHTS}
    for s in range(cfg.max_refinement_steps):  # a test-side loop over steps
        x, z, g = aux.steps.u_latent[s], aux.steps.attn.z[s], g_probes.attn[s]
        f, grads = _brute_force(attn, x, z, g, pos, SEG, base)
        c = jnp.sqrt(sum(_frob(grads[n]) ** 2 for n in latent_heads.HEAD_WEIGHTS))
        _close(stats["attn"].c[s], c)
        _close(stats["attn"].c_k[s], _frob(grads["wk"]))
        _close(stats["attn"].o[s], jnp.abs(f))
        assert float(jnp.max(c)) > 0
        site = heads.site_head_grads(attn, x, z, g, pos, SEG, base)
        total = {n: total[n] + site[n] for n in total}
    for n in latent_heads.HEAD_WEIGHTS:
        _close(total[n], g_params["block"]["attn"][n])
    # Inactive heads: no importance, no cost, no goodness.
    inactive = ~aux.steps.attn.mask
    assert np.all(np.asarray(stats["attn"].c)[np.asarray(inactive)] == 0)
    assert np.all(np.asarray(stats["attn"].goodness)[np.asarray(inactive)] == 0)


def _reference_sublayer(attn, xn, z, positions, segment_ids, rope_base):
    """``A_t = sum_p z_tp y_tp`` by a plain loop over rows, heads and queries (numpy float64)."""
    a = np.zeros(xn.shape)
    for b in range(xn.shape[0]):
        for p in range(z.shape[-1]):
            w = {n: attn[n][p] for n in latent_heads.HEAD_WEIGHTS}
            for t in range(xn.shape[1]):
                # d/dg <g, z_tp y_tp> = z_tp y_tp
                grad_g = jax.grad(_one_head_share, argnums=3)(
                    w, xn[b], z[b, t, p], jnp.zeros(xn.shape[-1]), positions[b], segment_ids[b],
                    t, rope_base)
                a[b, t] += np.asarray(grad_g, np.float64)
    return a


@pytest.mark.parametrize("rope", ["none", "rope1d"])
def test_forward_is_the_routed_sum_of_latent_head_outputs(rope):
    cfg = _model_cfg(rope)
    attn = modules.init_params(jax.random.key(0), cfg)["block"]["attn"]
    xn = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden))
    r = latent_heads.route_heads(attn, xn, cfg)
    assert r.z.shape == (B, T, cfg.num_attn_experts)
    got = latent_heads.attention_core(attn, xn, r.z, None, POS, SEG, cfg)
    want = _reference_sublayer(attn, xn, r.z, POS, SEG, cfg.rope_base if rope == "rope1d"
                               else None)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert 0 < float(jnp.mean(r.mask)) < 1  # CAPR: some heads on, some off


@pytest.mark.parametrize("mode", ["capr", "topk", "dense"])
def test_one_router_picks_heads_per_token(mode):
    """z (B,T,P) from ``proto_attn`` (P, D) and ``gate_attn`` (P,): the routing contract, top-k
    with exactly k heads, dense uniform; a head outside ``live`` is never picked."""
    cfg = tiny_model_config(attn_routing=mode, num_attn_experts=5, attn_top_k=2)
    attn = modules.init_params(jax.random.key(0), cfg)["block"]["attn"]
    assert attn["proto_attn"].shape == (5, cfg.hidden) and attn["gate_attn"].shape == (5,)
    xn = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden))
    live = jnp.array([True, False, True, True, True])
    for lv in (None, live):
        r = latent_heads.route_heads(attn, xn, cfg, live=lv)
        z, mask = np.asarray(r.z), np.asarray(r.mask)
        assert np.all(z >= 0) and np.all(z[~mask] == 0) and np.all(z[mask] > 0)
        np.testing.assert_array_equal(r.k, mask.sum(-1))
        n_live = 5 if lv is None else 4
        if mode == "topk":
            assert np.all(mask.sum(-1) == 2)
            np.testing.assert_allclose(z.sum(-1), 1.0, rtol=1e-6)
        if mode == "dense":
            np.testing.assert_allclose(z[mask], 1.0 / n_live, rtol=1e-6)
        if lv is not None:
            assert not mask[..., 1].any()
            # A dead head is the same as a head whose weight is 0 everywhere.
            full = latent_heads.route_heads(attn, xn, cfg)
            got = latent_heads.attention_core(attn, xn, r.z, None, POS, SEG, cfg)
            want = latent_heads.attention_core(attn, xn, r.z * mask, None, POS, SEG, cfg)
            np.testing.assert_array_equal(got, want)
            if mode == "capr":  # the others renormalise over the live heads
                np.testing.assert_array_equal(z, np.where(live, np.asarray(full.z), 0.0))


def test_config_layout_validation():
    assert ModelConfig().attn_layout == "latent_heads"  # the seed's layout is the default
    assert tiny_model_config().routed_sites == ("attn", "ffn")
    assert tiny_model_config(attn_layout="qkv_routers").routed_sites == ("q", "k", "v", "ffn")
    with pytest.raises(ConfigError, match="attn_layout"):
        ModelConfig(attn_layout="heads")
    with pytest.raises(ConfigError, match="attn_dispatch"):
        ModelConfig(attn_dispatch="sparse")  # latent heads are evaluated densely only
    ModelConfig(attn_dispatch="sparse", attn_layout="qkv_routers")
    ModelConfig(attn_dispatch="sparse", attn_kind="mha")


def test_one_probe_per_step_on_the_routed_sum():
    """The attn site has one zero probe (S,B,T,D) on A and no statistics sink (its closed forms
    run after the backward pass); the probe leaves the forward unchanged."""
    cfg = tiny_model_config(ffn_dispatch="dense")
    probes = tr.zero_probes(cfg, B, T)
    assert {k: v.shape for k, v in probes.present().items()} == {
        "attn": (cfg.max_refinement_steps, B, T, cfg.hidden),
        "ffn": (cfg.max_refinement_steps, B, T, cfg.hidden)}
    params, inputs, _, _ = _model_data(cfg)
    a, _ = tr.forward(params, inputs, cfg, positions=POS, segment_ids=SEG)
    b, _ = tr.forward(params, inputs, cfg, positions=POS, segment_ids=SEG, probes=probes)
    np.testing.assert_array_equal(a, b)


def test_parameters_groups_and_expert_axes():
    cfg = tiny_model_config()
    attn = modules.init_params(jax.random.key(0), cfg)["block"]["attn"]
    p, d, dh = cfg.num_attn_experts, cfg.hidden, cfg.head_dim
    assert {n: a.shape for n, a in attn.items()} == {
        "proto_attn": (p, d), "gate_attn": (p,), "wq": (p, d, dh), "wk": (p, d, dh),
        "wv": (p, d, dh), "wo": (p, dh, d)}
    labels = modules.param_labels(cfg)["block"]["attn"]
    assert {n for n, lab in labels.items() if lab == META} == {"proto_attn", "gate_attn"}
    assert set(modules.expert_axes(cfg)["block"]["attn"].values()) == {0}


def _batch():
    toks = jax.random.randint(jax.random.key(5), (B, T + 1), 0, 18)
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:],
                weights=(SEG > 0).astype(jnp.float32), segment_ids=SEG, positions=POS)


@pytest.mark.parametrize("variant", ["entropy_minus", "dyntrm_original"])
def test_meta_loss_of_the_attn_site_equals_direct_computation(variant):
    """The scanned SARS pass on the attn site: meta loss and its gradient on ``proto_attn`` /
    ``gate_attn`` equal the loss written directly over all steps from ``all_site_stats``."""
    cfg = _model_cfg("rope1d")
    params, inputs, targets, w = _model_data(cfg)
    probes = tr.zero_probes(cfg, B, T)

    def loss(pr):
        logits, aux = tr.forward(params, inputs, cfg, positions=POS, segment_ids=SEG, probes=pr)
        return task_loss.cross_entropy(logits, targets, w), aux

    (_, aux), gprobe = jax.value_and_grad(loss, has_aux=True)(probes)
    valid = (SEG > 0).astype(jnp.float32)
    res = engine.sars_pass(params, aux, gprobe, valid, cfg, "attribution", variant)
    stats = surprise.all_site_stats(params, aux, gprobe, cfg)
    labels = modules.param_labels(cfg)

    def direct(p):
        p = jax.tree.map(lambda a, lab: a if lab == META else jax.lax.stop_gradient(a), p, labels)
        total = 0.0
        routers = meta_losses.site_routers(p, cfg)
        assert set(routers) == {"attn", "ffn"}
        for site, router in routers.items():
            u = aux.steps.expert_input(site)
            r = routing.prototype_scores(u, router.proto, router.gate)
            per_tok = meta_losses.site_meta_loss(r, stats[site], router.mode, router.top_k,
                                                 variant)  # (S,B,T)
            vw = jnp.broadcast_to(valid[None], per_tok.shape)
            total = total + jnp.sum(per_tok * vw) / jnp.sum(vw)
        return total / len(routers)

    want, grad = jax.value_and_grad(direct)(params)
    np.testing.assert_allclose(res.meta_loss, want, rtol=1e-5)
    chex.assert_trees_all_close(res.g_meta, grad, rtol=1e-4, atol=1e-8)
    assert float(jnp.abs(res.g_meta["block"]["attn"]["proto_attn"]).max()) > 0
    active = aux.steps.attn.mask * valid[None, ..., None]
    np.testing.assert_allclose(res.metrics["sars/C_mean/attn"],
                               jnp.sum(stats["attn"].c * active) / jnp.sum(active), rtol=1e-5)


@pytest.mark.parametrize("layout", ["latent_heads", "qkv_routers"])
def test_train_step_metrics_of_each_layout(layout):
    cfg = Config(model=tiny_model_config(attn_layout=layout),
                 optim=OptimizerConfig(name="adam", kwargs=()),
                 meta_optim=OptimizerConfig(name="adam", kwargs=()))
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    _, m = DYNTRM.make_train_step(cfg, opt, donate=False)(state, _batch())
    sites = ("attn",) if layout == "latent_heads" else ("q", "k", "v")
    for site in (*sites, "ffn"):
        assert 0 < float(m[f"route/avg_k/{site}"]) <= cfg.model.num_attn_experts
        assert np.isfinite(float(m[f"sars/C_mean/{site}"]))
    assert m["experts/usage_attn"].shape == (cfg.model.num_attn_experts,)
    assert np.all((np.asarray(m["experts/usage_attn"]) >= 0)
                  & (np.asarray(m["experts/usage_attn"]) <= 1))
    assert DYNTRM.num_experts(cfg) == cfg.model.num_attn_experts + cfg.model.num_ffn_experts
    assert float(m["train/grad_norm_meta"]) > 0 and np.isfinite(float(m["train/loss"]))


def test_usage_is_the_share_of_valid_token_steps_per_head():
    cfg = Config(model=tiny_model_config(), optim=OptimizerConfig(name="adam", kwargs=()),
                 meta_optim=OptimizerConfig(name="adam", kwargs=()))
    params = modules.init_params(jax.random.key(0), cfg.model)
    batch = _batch()
    from tinyonn_jax.families.dyntrm import step as st

    g = st.compute_gradients(params, batch, cfg)
    m = st.step_metrics(cfg, batch, g.logits, g.aux, g.parts, g.sars_metrics, g.meta_loss,
                        g.loss, g.g_main, g.g_meta)
    mask = np.asarray(g.aux.steps.attn.mask)  # (S,B,T,P)
    valid = np.asarray(SEG > 0)
    want = mask[:, valid].mean(axis=(0, 1))
    np.testing.assert_allclose(m["experts/usage_attn"], want, rtol=1e-6)
    k = np.asarray(g.aux.steps.attn.k)[:, valid]
    np.testing.assert_allclose(m["route/avg_k/attn"], k.mean(), rtol=1e-6)


def test_bf16_compute_keeps_the_heads_routing_in_f32():
    f32 = tiny_model_config()
    bf16 = dataclasses.replace(f32, compute_dtype="bfloat16")
    params = modules.init_params(jax.random.key(0), f32)
    toks = _batch()["inputs"]
    l32, _ = tr.forward(params, toks, f32)
    l16, aux16 = tr.forward(params, toks, bf16)
    assert aux16.steps.attn.z.dtype == jnp.float32 and aux16.steps.u_latent.dtype == jnp.bfloat16
    np.testing.assert_allclose(l16, l32, atol=0.1)
