"""SARS against brute force (issue 3): per-token, per-site and total per-expert gradients."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_model_config

from tinyonn_jax import loss as task_loss
from tinyonn_jax import optim
from tinyonn_jax.config import Config, OptimizerConfig, SarsConfig
from tinyonn_jax.families.dyntrm import dynmoe, dynsiha, modules
from tinyonn_jax.families.dyntrm import step as st
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.family import DYNTRM
from tinyonn_jax.families.dyntrm.sars import surprise
from tinyonn_jax.nn import attention, context
from tinyonn_jax.nn.norm import layer_norm
from tinyonn_jax.nn.variables import META

B, T = 1, 6


def _data(cfg, seed=0):
    params = modules.init_params(jax.random.key(seed), cfg)
    toks = jax.random.randint(jax.random.key(seed + 7), (B, T + 1), 0, cfg.vocab_size)
    w = jnp.ones((B, T)).at[:, 0].set(0.0)
    return params, toks[:, :-1], toks[:, 1:], w


def _ce_with_probes(params, probes, inputs, targets, w, cfg):
    logits, aux = tr.forward(params, inputs, cfg, probes=probes)
    return task_loss.cross_entropy(logits, targets, w), aux


def _probe_grads(params, inputs, targets, w, cfg):
    probes = tr.zero_probes(cfg, B, T)
    (loss, aux), (gp, gprobe) = jax.value_and_grad(_ce_with_probes, argnums=(0, 1), has_aux=True)(
        params, probes, inputs, targets, w, cfg)
    return loss, aux, gp, gprobe


def _copied_forward(params, copies, inputs, cfg):
    """The model's forward with its own bank copy for every (step, site, token): the brute force.

    copies['attn'][c] = {'w1': (S,B,T,H,P,Dh,F), 'w2': ...}; copies['ffn'] = {'w1': (S,B,T,E,D,F)}.
    """
    blk = params["block"]
    ctx = context.make_context(inputs)
    x = tr.embed(params, inputs, cfg)
    slots = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = attention.attention_mask(slots, slots, ctx.segment_ids, ctx.segment_ids)

    def expert_out(w1, w2, u, z):  # one bank copy per token: no sharing at all
        h = jnp.einsum("...d,...pdf->...pf", u, w1)
        return jnp.einsum("...p,...pf,...pfo->...o", z, jax.nn.silu(h), w2)

    for s in range(cfg.max_refinement_steps):
        u = attention.split_heads(layer_norm(blk["ln1"], x, cfg.ln_eps), cfg.num_heads)
        routes = dynsiha.route_attention(blk["attn"], u, cfg)
        qkv = {c: expert_out(copies["attn"][c]["w1"][s], copies["attn"][c]["w2"][s], u,
                             routes[c].z) for c in "qkv"}
        q, k = qkv["q"], qkv["k"]
        if cfg.rope != "none":
            q, k = attention.rope(q, ctx.positions, cfg.rope_base), attention.rope(
                k, ctx.positions, cfg.rope_base)
        o = attention.dot_product_attention(q, k, qkv["v"], mask).reshape(B, T, -1)
        x = x + o @ blk["attn"]["o_proj"]
        uf = layer_norm(blk["ln2"], x, cfg.ln_eps)
        rf = dynmoe.route_ffn(blk["ffn"], uf, cfg)
        x = x + expert_out(copies["ffn"]["w1"][s], copies["ffn"]["w2"][s], uf, rf.z)
    return tr.make_readout(cfg)(params, x)[1]


def _make_copies(params, cfg):
    s, h = cfg.max_refinement_steps, cfg.num_heads
    lib, bank = params["block"]["attn"]["library"], params["block"]["ffn"]["bank"]
    rep = lambda a, lead: jnp.broadcast_to(a, (*lead, *a.shape))  # noqa: E731
    return {"attn": {c: {k: rep(lib[k], (s, B, T, h)) for k in ("w1", "w2")} for c in "qkv"},
            "ffn": {k: rep(bank[k], (s, B, T)) for k in ("w1", "w2")}}


@pytest.fixture(scope="module", params=["capr", "topk"])
def brute(request):
    """The q, k, v layout (its library is an ExpertBank; the latent heads are brute-forced in
    test_latent_heads.py) with DynMoE routing by CAPR (dynamic K) or top-k."""
    cfg = tiny_model_config(attn_layout="qkv_routers", ffn_routing=request.param)
    params, inputs, targets, w = _data(cfg)
    loss, aux, gp, gprobe = _probe_grads(params, inputs, targets, w, cfg)
    copies = _make_copies(params, cfg)

    def loss_copies(cp):
        logits = _copied_forward(params, cp, inputs, cfg)
        return task_loss.cross_entropy(logits, targets, w)

    loss_b, g_copies = jax.value_and_grad(loss_copies)(copies)
    return dict(cfg=cfg, params=params, loss=loss, loss_b=loss_b, aux=aux, gp=gp, gprobe=gprobe,
                g_copies=g_copies)


def _close(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_brute_force_forward_is_the_model(brute):
    _close(brute["loss"], brute["loss_b"], 1e-6)
    cfg, k = brute["cfg"], np.asarray(brute["aux"].steps.ffn.k)
    if cfg.ffn_routing == "topk":  # the top-k FFN routing really ran: exactly k experts each
        assert np.all(k == cfg.ffn_top_k)
    else:  # CAPR: a dynamic number of experts
        assert len(np.unique(k)) > 1


def test_per_token_norms_equal_brute_force(brute):
    cfg, params = brute["cfg"], brute["params"]
    stats = surprise.all_site_stats(params, brute["aux"], brute["gprobe"], cfg)
    norm = lambda g: jnp.sqrt(jnp.sum(jnp.square(g), axis=(-1, -2)))  # noqa: E731
    for site in ("q", "k", "v", "ffn"):
        gc = brute["g_copies"]["ffn"] if site == "ffn" else brute["g_copies"]["attn"][site]
        n1, n2 = norm(gc["w1"]), norm(gc["w2"])
        _close(stats[site].c_w1, n1)
        _close(stats[site].c_w2, n2)
        _close(stats[site].c, jnp.sqrt(n1**2 + n2**2))
        assert float(jnp.max(n1)) > 0


def test_per_site_and_total_expert_grads_equal_brute_force(brute):
    cfg, params, aux, gprobe = brute["cfg"], brute["params"], brute["aux"], brute["gprobe"]
    lib = params["block"]["attn"]["library"]
    bank = params["block"]["ffn"]["bank"]
    total = {"attn": jax.tree.map(jnp.zeros_like, lib), "ffn": jax.tree.map(jnp.zeros_like, bank)}
    for s in range(cfg.max_refinement_steps):
        for site in ("q", "k", "v", "ffn"):
            kind = "ffn" if site == "ffn" else "attn"
            g = surprise.site_expert_grads(bank if kind == "ffn" else lib,
                                           *surprise.site_inputs(aux, gprobe, site, s))
            gc = brute["g_copies"]["ffn"] if kind == "ffn" else brute["g_copies"]["attn"][site]
            axes = (0, 1) if kind == "ffn" else (0, 1, 2)
            for k in ("w1", "w2"):
                _close(g[k], gc[k][s].sum(axis=axes))
            _close(surprise.expert_grad_norms(g),
                   jnp.sqrt(sum(jnp.sum(gc[k][s].sum(axis=axes) ** 2, axis=(1, 2))
                                for k in ("w1", "w2"))))
            total[kind] = jax.tree.map(jnp.add, total[kind], g)
    # The per-site gradients add up to jax.grad of the stacked bank.
    chex.assert_trees_all_close(total["attn"], brute["gp"]["block"]["attn"]["library"],
                                rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(total["ffn"], brute["gp"]["block"]["ffn"]["bank"],
                                rtol=1e-5, atol=1e-7)


def test_attribution_importance_equals_direct_formula(brute):
    cfg, params, aux, gprobe = brute["cfg"], brute["params"], brute["aux"], brute["gprobe"]
    stats = surprise.all_site_stats(params, aux, gprobe, cfg)
    from tinyonn_jax.nn import experts
    y = experts.bank_outputs(params["block"]["ffn"]["bank"], aux.steps.u_ffn)  # (S,B,T,E,D)
    direct = jnp.abs(jnp.einsum("sbtpd,sbtd->sbtp", aux.steps.ffn.z[..., None] * y, gprobe.ffn))
    _close(stats["ffn"].o, direct)
    orig = surprise.all_site_stats(params, aux, gprobe, cfg, importance="output_grad")
    assert np.allclose(orig["ffn"].o, orig["ffn"].o[..., :1])  # degenerate across experts


def test_probes_do_not_change_the_forward(tiny_cfg):
    params, inputs, _, _ = _data(tiny_cfg)
    a, _ = tr.forward(params, inputs, tiny_cfg)
    b, _ = tr.forward(params, inputs, tiny_cfg, probes=tr.zero_probes(tiny_cfg, B, T))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_goodness_formula():
    o = jnp.array([[1.0, 2.0, 0.0]])
    z = jnp.array([[0.5, 1.0, 0.0]])
    c = jnp.array([[4.0, 1.0, 0.0]])
    expected = np.array([[0.5 * (0.5 - 1.0), 1.0 * (1.0 - 0.25), 0.0]])
    np.testing.assert_allclose(surprise.goodness(o, z, c), expected, atol=1e-8)


def _full_cfg(**sars):
    return Config(model=tiny_model_config(), sars=SarsConfig(**sars),
                  optim=OptimizerConfig(name="adam", kwargs=()),
                  meta_optim=OptimizerConfig(name="adam", kwargs=()))


def _batch(cfg, seed=0):
    _, inputs, targets, w = _data(cfg.model, seed)
    return dict(inputs=inputs, targets=targets, weights=w,
                segment_ids=jnp.ones((B, T), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(T), (B, T)))


def test_gradient_isolation():
    cfg = _full_cfg()
    params = modules.init_params(jax.random.key(0), cfg.model)
    labels = modules.param_labels(cfg.model)
    _, g_main, g_meta, *_ = st.compute_gradients(params, _batch(cfg), cfg)
    for (path, gm), gt, lab in zip(jax.tree_util.tree_flatten_with_path(g_main)[0],
                                   jax.tree.leaves(g_meta), jax.tree.leaves(labels),
                                   strict=True):
        if lab == META:
            assert np.all(np.asarray(gm) == 0), path  # main loss never reaches routing params
        else:
            assert np.all(np.asarray(gt) == 0), path  # meta loss never reaches computation
    assert any(np.any(np.asarray(g) != 0) for g, lab in
               zip(jax.tree.leaves(g_meta), jax.tree.leaves(labels), strict=True) if lab == META)
    # Without isolation the main loss also trains the routing params (the original DynTRM).
    cfg_o = dataclasses.replace(cfg, sars=SarsConfig(isolate=False))
    _, g_main_o, *_ = st.compute_gradients(params, _batch(cfg), cfg_o)
    assert np.any(np.asarray(g_main_o["block"]["ffn"]["proto"]) != 0)


def test_meta_weight_leaves_main_update_unchanged():
    results = []
    for w_meta in (0.0, 1.0):
        cfg = _full_cfg(w_meta=w_meta)
        opt = DYNTRM.build_optimizer(cfg)
        state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
        state, _ = DYNTRM.make_train_step(cfg, opt)(state, _batch(cfg))
        results.append(state.params)
    labels = modules.param_labels(cfg.model)
    for a, b, lab in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]),
                         jax.tree.leaves(labels), strict=True):
        if lab != META:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b, lab in zip(
        jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), jax.tree.leaves(labels),
        strict=True) if lab == META)


def test_main_loss_leaves_meta_update_unchanged():
    """The meta loss's weight changes nothing of the main gradient; at weight 0 the routing
    parameters receive no gradient at all (isolation)."""
    cfg = _full_cfg()
    params = modules.init_params(jax.random.key(0), cfg.model)
    _, g_main, g_meta, *_ = st.compute_gradients(params, _batch(cfg), cfg)
    cfg0 = dataclasses.replace(cfg, sars=SarsConfig(w_meta=0.0))
    _, g_main0, g_meta0, *_ = st.compute_gradients(params, _batch(cfg), cfg0)
    chex.assert_trees_all_equal(g_main, g_main0)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_meta0))


@pytest.mark.parametrize("variant", ["entropy_plus", "entropy_minus", "entropy_plain",
                                     "dyntrm_original"])
def test_meta_loss_variants_train_routing(variant):
    cfg = _full_cfg(meta_loss=variant)
    params = modules.init_params(jax.random.key(0), cfg.model)
    _, _, g_meta, *_, meta_loss = st.compute_gradients(params, _batch(cfg), cfg)
    assert np.isfinite(float(meta_loss))
    assert float(optax.tree.norm(g_meta)) > 0


def test_swapping_optimizer_in_config_changes_the_chain():
    params = modules.init_params(jax.random.key(0), tiny_model_config())
    grads = jax.tree.map(jnp.ones_like, params)
    outs = {}
    no_decay = (("weight_decay", 0.0),)
    for name, kw in (("adamw", no_decay), ("lion", no_decay), ("sgd", ())):
        cfg = Config(model=tiny_model_config(),
                     optim=OptimizerConfig(name=name, kwargs=kw, learning_rate=0.1))
        opt = DYNTRM.build_optimizer(cfg)
        upd, _ = opt.update(grads, opt.init(params), params)
        outs[name] = float(upd["lm_head"][0, 0])
    np.testing.assert_allclose(outs["sgd"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(outs["lion"], -0.1, rtol=1e-6)  # sign update
    np.testing.assert_allclose(outs["adamw"], -0.1, rtol=1e-3)
    clipped = optim.build_chain(OptimizerConfig(name="sgd", kwargs=(), learning_rate=1.0,
                                                clip_value=0.25))
    upd, _ = clipped.update({"a": jnp.array([3.0, -0.1])}, clipped.init({"a": jnp.zeros(2)}))
    np.testing.assert_allclose(upd["a"], [-0.25, 0.1], rtol=1e-6)
    with pytest.raises(ValueError, match="no optimizer"):
        optim.build_chain(OptimizerConfig(name="adamz"))


def test_non_finite_loss_skips_update():
    cfg = _full_cfg()
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    before = jax.tree.map(np.asarray, state.params)
    batch = _batch(cfg)
    batch["weights"] = batch["weights"].at[0, 2].set(jnp.nan)
    state, m = DYNTRM.make_train_step(cfg, opt, donate=False)(state, batch)
    assert int(state.skipped) == 1 and float(m["train/update_ok"]) == 0.0
    chex.assert_trees_all_equal(before, jax.tree.map(np.asarray, state.params))


def test_tiny_config_loss_falls_on_a_real_arc_task():
    from pathlib import Path

    from tinyonn_jax import trainer
    from tinyonn_jax.data.batching import pack_sequences
    from tinyonn_jax.data.tasks import load_tasks
    from tinyonn_jax.data.tokenizer import serialize_task

    cfg = trainer.load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    task = next(t for t in load_tasks("arc1", "train") if t.task_id == "d631b094")
    batch = pack_sequences([serialize_task(task, 0)], 1, 128, 512)[0][0]
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    step = DYNTRM.make_train_step(cfg, opt)
    losses = []
    for _ in range(50):
        state, m = step(state, batch)
        losses.append(float(m["train/main_loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def _direct_meta_loss(params, aux, stats, valid, cfg, variant):
    """The meta loss on every step at once, the oracle of the scanned ``engine.sars_pass``:
    mean over sites, steps and valid tokens. stats: site -> SiteStats (S,B,T[,H],P); valid (B,T).
    """
    from tinyonn_jax.families.dyntrm.sars import losses as meta_losses
    from tinyonn_jax.nn import routing

    total = 0.0
    routers = meta_losses.site_routers(params, cfg)
    for site, router in routers.items():
        u = jax.lax.stop_gradient(aux.steps.expert_input(site))
        r = routing.prototype_scores(u, router.proto, router.gate)
        per_tok = meta_losses.site_meta_loss(r, stats[site], router.mode, router.top_k,
                                             variant)  # (S,B,T[,H])
        w = valid.reshape(1, *valid.shape, *([1] * (per_tok.ndim - 3)))
        w = jnp.broadcast_to(w, per_tok.shape)
        total = total + jnp.sum(per_tok * w) / jnp.maximum(jnp.sum(w), 1.0)
    return total / len(routers)


@pytest.mark.parametrize("variant", ["entropy_plus", "dyntrm_original"])
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_scanned_sars_pass_equals_direct_computation(variant, dispatch):
    from tinyonn_jax.families.dyntrm.sars import engine

    cfg = dataclasses.replace(tiny_model_config(attn_layout="qkv_routers"), attn_dispatch=dispatch,
                              ffn_dispatch=dispatch, capacity_frac=1.0)
    params, inputs, targets, w = _data(cfg)
    _, aux, _, gprobe = _probe_grads(params, inputs, targets, w, cfg)
    valid = jnp.ones((B, T)).at[0, -1].set(0.0)
    res = engine.sars_pass(params, aux, gprobe, valid, cfg, "attribution", variant)
    stats = surprise.all_site_stats(params, aux, gprobe, cfg)
    labels = modules.param_labels(cfg)

    def direct(p):
        p = jax.tree.map(lambda x, lab: x if lab == META else jax.lax.stop_gradient(x), p, labels)
        return _direct_meta_loss(p, aux, stats, valid, cfg, variant)

    loss, grad = jax.value_and_grad(direct)(params)
    np.testing.assert_allclose(res.meta_loss, loss, rtol=1e-5)
    chex.assert_trees_all_close(res.g_meta, grad, rtol=1e-4, atol=1e-8)
    active = (aux.steps.ffn.z > 0) * valid[None, ..., None]
    np.testing.assert_allclose(res.metrics["sars/C_mean/ffn"],
                               jnp.sum(stats["ffn"].c * active) / jnp.sum(active), rtol=1e-5)


@pytest.mark.parametrize("mode", ["capr", "topk", "dense"])
def test_sars_pass_rebuilds_the_forward_routing_weights(mode):
    """The SARS pass keeps bool decisions per step and rebuilds z from u: the forward's z."""
    from tinyonn_jax.families.dyntrm.sars import losses as meta_losses
    from tinyonn_jax.nn import routing

    cfg = tiny_model_config(attn_routing=mode, ffn_routing=mode)
    params, inputs, _, _ = _data(cfg)
    _, aux = jax.jit(tr.forward, static_argnums=2)(params, inputs, cfg)
    for site, router in meta_losses.site_routers(params, cfg).items():
        res = aux.steps.site(site)
        z = routing.weights_for_decision(aux.steps.expert_input(site), router.proto, router.gate,
                                         res.mask, router.mode)
        np.testing.assert_array_equal(res.mask, res.z > 0)
        np.testing.assert_allclose(z, res.z, rtol=1e-6, atol=1e-7)
