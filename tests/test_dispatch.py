"""Sparse dispatch equals dense when nothing overflows (issue 8): forward, grads, SARS."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from tinyonn_jax import loss as task_loss
from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.family import DYNTRM
from tinyonn_jax.families.dyntrm.sars import surprise
from tinyonn_jax.nn import experts

B, T = 2, 6


def test_dispatch_indices_fill_queues_in_order():
    mask = jnp.array([[1, 0], [1, 1], [0, 1], [1, 1]], bool)
    idx = experts.dispatch_indices(mask, 2)
    np.testing.assert_array_equal(idx, [[0, 1], [1, 2]])  # both experts drop row 3
    assert int(experts.overflow_count(mask, 2)) == 2
    idx3 = experts.dispatch_indices(mask, 3)
    np.testing.assert_array_equal(idx3, [[0, 1, 3], [1, 2, 3]])
    np.testing.assert_array_equal(experts.dispatch_indices(mask, 4)[0], [0, 1, 3, 4])  # 4 = empty


def test_sparse_bank_equals_dense_and_drops_overflow():
    bank = experts.init_bank(jax.random.key(0), 5, 4, 6, 3)
    u = jax.random.normal(jax.random.key(1), (3, 7, 4))
    z = jax.nn.relu(jax.random.normal(jax.random.key(2), (3, 7, 5)))
    dense = experts.apply_dense(bank, u, z)
    np.testing.assert_allclose(experts.apply_sparse(bank, u, z, 1.0), dense, rtol=1e-5,
                               atol=1e-6)
    # With capacity 2 per expert, the result is dense composition over the kept pairs only.
    z2 = z.reshape(-1, 5)
    idx = experts.dispatch_indices(z2 > 0, 2)
    kept = jnp.zeros_like(z2).at[idx, jnp.arange(5)[:, None]].set(1.0, mode="drop")
    want = experts.apply_dense(bank, u, (z2 * kept).reshape(z.shape))
    got = experts.apply_sparse(bank, u, z, 2 / 21)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _cfgs(**kw):
    dense = tiny_model_config(attn_layout="qkv_routers", **kw)  # the library's sparse dispatch
    sparse = dataclasses.replace(dense, attn_dispatch="sparse", ffn_dispatch="sparse",
                                 capacity_frac=1.0)
    return dense, sparse


@pytest.mark.parametrize("routing", ["capr", "topk"])
def test_sparse_model_equals_dense_forward_grads_and_sars(routing):
    dense, sparse = _cfgs(attn_routing=routing, ffn_routing=routing)
    params = modules.init_params(jax.random.key(0), dense)
    toks = jax.random.randint(jax.random.key(1), (B, T + 1), 0, 18)
    inputs, targets, w = toks[:, :-1], toks[:, 1:], jnp.ones((B, T))

    def run(cfg):
        probes = tr.zero_probes(cfg, B, T)

        def f(p, pr):
            logits, aux = tr.forward(p, inputs, cfg, probes=pr)
            return task_loss.cross_entropy(logits, targets, w), aux

        (loss, aux), (gp, gpr) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            params, probes)
        return loss, aux, gp, surprise.all_site_stats(params, aux, gpr, cfg)

    ld, auxd, gd, sd = run(dense)
    ls, auxs, gs, ss = run(sparse)
    np.testing.assert_allclose(ld, ls, rtol=1e-5)
    chex.assert_trees_all_close(gd, gs, rtol=1e-5, atol=1e-6)
    for site in sd:
        for name in ("c", "c_w1", "c_w2", "o"):
            a, b = getattr(sd[site], name), getattr(ss[site], name)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(a).max()))
        # Goodness lies in [-1, 1] but divides by per-token maxima that can be tiny, which
        # magnifies float32 summation-order noise; compare it on its absolute scale.
        np.testing.assert_allclose(sd[site].goodness, ss[site].goodness, atol=1e-5)
    assert all(int(auxs.steps.site(s).overflow.sum()) == 0 for s in ("q", "k", "v", "ffn"))


def _kept_by_union(masks, cap):
    """Brute force: per expert, the first ``cap`` rows active in any mask are evaluated."""
    union = np.any(np.stack([np.asarray(m) for m in masks]), axis=0)
    kept = np.zeros_like(union)
    for p in range(union.shape[1]):
        kept[np.flatnonzero(union[:, p])[:cap], p] = True
    return kept


def test_shared_dispatch_evaluates_the_union_once():
    bank = experts.init_bank(jax.random.key(0), 5, 4, 6, 3)
    u = jax.random.normal(jax.random.key(1), (21, 4))
    zs = tuple(jax.nn.relu(jax.random.normal(jax.random.key(2 + i), (21, 5)) - 0.3)
               for i in range(3))
    for frac in (1.0, 3 / 21):  # everything fits / later rows of the union dropped
        cap = experts.capacity(21, frac)
        kept = jnp.asarray(_kept_by_union([z > 0 for z in zs], cap))
        got = experts.apply_sparse_shared(bank, u, zs, frac)
        for z, g in zip(zs, got, strict=True):
            want = experts.apply_dense(bank, u, z * kept)
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6)
            dropped = int(np.sum(np.asarray(z > 0) & ~np.asarray(kept)))
            union = experts.union_mask([zz > 0 for zz in zs])
            np.testing.assert_array_equal(experts.kept_pairs(union, cap), kept)
            assert int(experts.dropped_count(z > 0, experts.kept_pairs(union, cap))) == dropped
        # SARS statistics of the shared dispatch == dense statistics with dropped pairs removed.
        gs = tuple(jax.random.normal(jax.random.key(9 + i), (21, 3)) for i in range(3))
        sparse = surprise.token_stats_sparse_shared(bank, u, zs, gs, frac, "attribution")
        dense = surprise.token_stats(bank, u, tuple(z * kept for z in zs), gs, "attribution")
        for a, b in zip(sparse, dense, strict=True):
            for name in ("c", "c_w1", "c_w2", "o", "goodness"):
                np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-5,
                                           atol=1e-6)
    mask = zs[0] > 0  # a single site: dropped pairs == overflow
    assert int(experts.dropped_count(mask, experts.kept_pairs(mask, 2))) == int(
        experts.overflow_count(mask, 2))


def test_scan_equals_batched_dense():
    """``scan`` (one expert at a time) computes the same sums as the batched einsum."""
    dense = tiny_model_config(attn_dispatch="dense", ffn_dispatch="dense",
                              attn_layout="qkv_routers")
    scan = dataclasses.replace(dense, attn_dispatch="scan", ffn_dispatch="scan")
    params = modules.init_params(jax.random.key(0), dense)
    toks = jax.random.randint(jax.random.key(1), (B, T + 1), 0, 18)

    def loss(p, cfg):
        logits, _ = tr.forward(p, toks[:, :-1], cfg)
        return task_loss.cross_entropy(logits, toks[:, 1:], jnp.ones((B, T)))

    ld, gd = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, dense)
    ls, gs = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, scan)
    np.testing.assert_allclose(ld, ls, rtol=1e-5)
    chex.assert_trees_all_close(gd, gs, rtol=1e-5, atol=1e-7)
    assert experts.resolve_dispatch("auto") == ("scan" if jax.default_backend() == "cpu"
                                                else "dense")


def test_overflow_is_counted():
    _, sparse = _cfgs()
    cfg = dataclasses.replace(sparse, capacity_frac=0.1)
    params = modules.init_params(jax.random.key(0), cfg)
    toks = jax.random.randint(jax.random.key(1), (B, T), 0, 18)
    _, aux = tr.forward(params, toks, cfg)
    for site, sharing in (("q", ("q", "k", "v")), ("v", ("q", "k", "v")), ("ffn", ("ffn",))):
        z = aux.steps.site(site).z
        flat = lambda x: np.asarray(x).reshape(-1, x.shape[-1]) > 0  # noqa: E731
        n = z[0].size // z.shape[-1]
        cap = experts.capacity(n, 0.1)
        want = [int(np.sum(flat(z[s]) & ~_kept_by_union([flat(aux.steps.site(c).z[s])
                                                          for c in sharing], cap)))
                for s in range(cfg.max_refinement_steps)]
        np.testing.assert_array_equal(aux.steps.site(site).overflow, want)
        assert sum(want) > 0


def test_attention_has_its_own_capacity():
    _, sparse = _cfgs()
    tight = dataclasses.replace(sparse, capacity_frac=0.1)
    params = modules.init_params(jax.random.key(0), tight)
    toks = jax.random.randint(jax.random.key(1), (B, T), 0, 18)
    _, aux_tight = tr.forward(params, toks, tight)
    roomy = dataclasses.replace(tight, attn_capacity_frac=1.0)
    logits, aux = tr.forward(params, toks, roomy)
    assert int(aux_tight.steps.q.overflow.sum()) > 0 and int(aux.steps.q.overflow.sum()) == 0
    # FFN capacity untouched: step 0 sees the same FFN inputs (attention drops nothing there
    # with the roomy capacity, as in the dense model), so its FFN overflow is unchanged.
    dense_aux = tr.forward(params, toks, dataclasses.replace(roomy, attn_dispatch="dense"))[1]
    assert int(aux.steps.ffn.overflow[0]) == int(dense_aux.steps.ffn.overflow[0]) > 0
    assert roomy.attn_capacity == 1.0 and tight.attn_capacity == 0.1


def test_overflow_reaches_the_train_metrics():
    from tinyonn_jax.config import Config, OptimizerConfig

    _, sparse = _cfgs()
    cfg = Config(model=dataclasses.replace(sparse, capacity_frac=0.1),
                 optim=OptimizerConfig(name="adam", kwargs=()),
                 meta_optim=OptimizerConfig(name="adam", kwargs=()))
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (B, T + 1), 0, 18)
    batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:], weights=jnp.ones((B, T)),
                 segment_ids=jnp.ones((B, T), jnp.int32),
                 positions=jnp.broadcast_to(jnp.arange(T), (B, T)))
    _, m = DYNTRM.make_train_step(cfg, opt)(state, batch)
    assert float(m["route/overflow/ffn"]) > 0 and np.isfinite(float(m["train/loss"]))


@pytest.mark.parametrize("importance", ["attribution", "output_grad"])
def test_scan_sars_statistics_equal_batched(importance):
    bank = experts.init_bank(jax.random.key(0), 5, 4, 6, 4)
    u = jax.random.normal(jax.random.key(1), (2, 7, 3, 4))  # (B, T, H, Dh): attention layout
    zs = tuple(jax.nn.relu(jax.random.normal(jax.random.key(2 + i), (2, 7, 3, 5)))
               for i in range(3))
    gs = tuple(jax.random.normal(jax.random.key(7 + i), (2, 7, 3, 4)) for i in range(3))
    want = surprise.token_stats(bank, u, zs, gs, importance)
    got = surprise.token_stats_scan(bank, u, zs, gs, importance)
    for a, b in zip(want, got, strict=True):
        for name in ("c", "c_w1", "c_w2", "o", "goodness"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scan_stats_backward_gives_the_grads_and_the_sars_statistics(dtype):
    """``apply_scan_stats``: output and gradients of ``apply_scan``; the sink's cotangent is the
    per-pair statistics of ``token_stats`` (unweighted by z)."""
    bank = experts.init_bank(jax.random.key(0), 5, 4, 6, 3)
    u = jax.random.normal(jax.random.key(1), (2, 7, 4)).astype(dtype)
    z = jax.nn.relu(jax.random.normal(jax.random.key(2), (2, 7, 5)))
    g = jax.random.normal(jax.random.key(3), (2, 7, 3)).astype(dtype)
    sink = jnp.zeros((2, 7, 5, experts.NUM_STAT_CHANNELS))
    out, vjp = jax.vjp(lambda b, u, z, s: experts.apply_scan_stats(b, u, z, s), bank, u, z, sink)
    ref, vjp_ref = jax.vjp(lambda b, u, z: experts.apply_scan(b, u, (z,))[0], bank, u, z)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), **tol)
    *grads, raw = vjp(g)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(vjp_ref(g)), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = surprise.token_stats(bank, f32(u), (z,), (f32(g),), "attribution")[0]
    got = surprise.stats_from_sink(z, g, raw, "attribution")
    for name in ("c", "c_w1", "c_w2", "o"):
        np.testing.assert_allclose(np.asarray(getattr(got, name)),
                                   np.asarray(getattr(want, name)), **tol)


@pytest.mark.parametrize("keep_hidden", [False, True])
def test_shared_scan_stats_backward_gives_every_weighting_its_statistics(keep_hidden):
    """``apply_scan_stats_shared`` (the q, k, v of the latent-head library): outputs and
    gradients of ``apply_scan``; the sink's cotangent holds each weighting's own statistics."""
    bank = experts.init_bank(jax.random.key(0), 5, 4, 6, 4)
    u = jax.random.normal(jax.random.key(1), (2, 7, 3, 4))  # (B, T, H, Dh)
    zs = tuple(jax.nn.relu(jax.random.normal(jax.random.key(2 + i), (2, 7, 3, 5)))
               for i in range(3))
    gs = tuple(jax.random.normal(jax.random.key(7 + i), (2, 7, 3, 4)) for i in range(3))
    sink = jnp.zeros((2, 7, 3, 5, 3, experts.NUM_STAT_CHANNELS))
    out, vjp = jax.vjp(lambda b, u, zs, s: experts.apply_scan_stats_shared(b, u, zs, s,
                                                                           keep_hidden),
                       bank, u, zs, sink)
    ref, vjp_ref = jax.vjp(lambda b, u, zs: experts.apply_scan(b, u, zs), bank, u, zs)
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-6)
    *grads, raw = vjp(gs)
    chex.assert_trees_all_close(tuple(grads), vjp_ref(gs), rtol=1e-5, atol=1e-6)
    want = surprise.token_stats(bank, u, zs, gs, "attribution")
    for i, (z, g) in enumerate(zip(zs, gs, strict=True)):
        got = surprise.stats_from_sink(z, g, raw[..., i, :], "attribution")
        for name in ("c", "c_w1", "c_w2", "o", "goodness"):
            np.testing.assert_allclose(getattr(got, name), getattr(want[i], name), rtol=1e-5,
                                       atol=1e-6)


@pytest.mark.parametrize("remat,attn_dispatch,ffn_dispatch", [
    ("none", "scan", "scan"),  # both statistics sinks
    ("full", "scan", "scan"),  # FFN sink; the library's statistics recomputed after the backward
    ("full", "dense", "sparse")])
def test_train_step_sars_from_the_experts_backward_equals_batched(remat, attn_dispatch,
                                                                  ffn_dispatch):
    """The train step's SARS quantities are the same whether the statistics come from the
    experts' backward pass (FFN: ``scan``, ``sparse``; latent-head library: ``scan`` without
    remat) or are recomputed from the probes (batched)."""
    from tinyonn_jax.config import Config
    from tinyonn_jax.families.dyntrm.step import compute_gradients

    dense = tiny_model_config(attn_dispatch="dense", ffn_dispatch="dense", remat=remat,
                              capacity_frac=1.0, attn_layout="qkv_routers")
    scan = dataclasses.replace(dense, attn_dispatch=attn_dispatch, ffn_dispatch=ffn_dispatch)
    assert tr.zero_probes(scan, B, T).ffn_stats is not None
    assert (tr.zero_probes(scan, B, T).attn_stats is not None) == (remat == "none")
    assert not {"ffn_stats", "attn_stats"} & set(tr.zero_probes(dense, B, T).present())
    params = modules.init_params(jax.random.key(0), dense)
    toks = jax.random.randint(jax.random.key(1), (B, T + 1), 0, 18)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": jnp.ones((B, T)),
             "segment_ids": jnp.ones((B, T), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(T), (B, T))}
    run = jax.jit(compute_gradients, static_argnums=2)
    want, got = run(params, batch, Config(model=dense)), run(params, batch, Config(model=scan))
    np.testing.assert_allclose(got.meta_loss, want.meta_loss, rtol=1e-5)
    chex.assert_trees_all_close(got.g_main, want.g_main, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(got.g_meta, want.g_meta, rtol=1e-4, atol=1e-7)
    for k in want.sars_metrics:
        # Shares of positive/negative goodness count signs: a pair whose mas(z) and mas(C) are
        # equal up to rounding (the same expert holding both maxima) may land on either side.
        sign_share = k in ("sars/goodness_pos", "sars/goodness_neg")
        np.testing.assert_allclose(got.sars_metrics[k], want.sars_metrics[k], rtol=1e-5,
                                   atol=0.03 if sign_share else 1e-7)


@pytest.mark.parametrize("frac", [1.0, 0.3])  # 0.3: some experts overflow
def test_sparse_stats_backward_gives_the_grads_and_the_sparse_statistics(frac):
    """``apply_sparse_stats``: output and gradients of ``apply_sparse``; statistics of
    ``token_stats_sparse`` (exact on dispatched pairs, zero on dropped and inactive ones)."""
    bank = experts.init_bank(jax.random.key(0), 5, 4, 6, 3)
    u = jax.random.normal(jax.random.key(1), (2, 7, 4))
    z = jax.nn.relu(jax.random.normal(jax.random.key(2), (2, 7, 5)))
    g = jax.random.normal(jax.random.key(3), (2, 7, 3))
    sink = jnp.zeros((2, 7, 5, experts.NUM_STAT_CHANNELS))
    out, vjp = jax.vjp(lambda b, u, z, s: experts.apply_sparse_stats(b, u, z, s, frac),
                       bank, u, z, sink)
    ref, vjp_ref = jax.vjp(lambda b, u, z: experts.apply_sparse(b, u, z, frac), bank, u, z)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    *grads, raw = vjp(g)
    chex.assert_trees_all_close(tuple(grads), vjp_ref(g), rtol=1e-5, atol=1e-6)
    want = surprise.token_stats_sparse(bank, u, z, g, frac, "attribution")
    got = surprise.stats_from_sink(z, g, raw, "attribution")
    for name in ("c", "c_w1", "c_w2", "o"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5,
                                   atol=1e-6)
    dropped = (z > 0) & (want.c == 0)
    assert (int(experts.overflow_count(z.reshape(-1, 5) > 0,
                                       experts.capacity(14, frac))) > 0) == (frac < 1)
    assert bool(jnp.all(got.c[dropped] == 0)) and int(jnp.sum(dropped)) == int(
        experts.overflow_count(z.reshape(-1, 5) > 0, experts.capacity(14, frac)))
