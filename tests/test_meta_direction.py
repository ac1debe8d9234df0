"""Which way a SARS meta step moves routing probability mass, per meta-loss variant.

On a fixed small DynTRM (fresh routers, so routing starts near uniform), the family's own gradient
pass gives the routing logits r and the per-token goodness G of every routed site. A meta step on
the logits is an infinitesimal step along -grad_r of the variant's loss; its effect is the exact
directional derivative (``jax.jvp``) of

  shift   = mean over (step, token[, head]) of sum_p softmax(r)_p * G_p   (mass on good experts)
  entropy = mean routing entropy H(softmax(r))

Since sum_p softmax(r)_p is 1, a step that moves mass toward high-goodness experts has
d shift > 0. The engine test then checks that the meta gradient the train step applies to the
routing parameters is exactly the gradient of that same loss through the routers (sign and
weight included), so the parameter step is the pull-back of the logit step. A sign error in a
variant or in how the engine applies it fails a test here; one in the goodness itself fails the
brute-force tests of tests/test_sars.py and tests/test_latent_heads.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from tinyonn_jax.config import Config, SarsConfig
from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm import step as st
from tinyonn_jax.families.dyntrm.sars import losses, surprise
from tinyonn_jax.nn import routing

B, T = 2, 8
MODES = ("capr", "topk")
LAYOUTS = ("latent_heads", "qkv_routers")


def _case(variant: str, mode: str, importance: str = "attribution",
          layout: str = "latent_heads", w_meta: float = 1.0):
    mc = tiny_model_config(attn_routing=mode, ffn_routing=mode, init_std=0.05,
                           attn_layout=layout)
    cfg = Config(family="dyntrm", model=mc,
                 sars=SarsConfig(meta_loss=variant, importance=importance, w_meta=w_meta))
    params = modules.init_params(jax.random.key(0), mc)
    toks = jax.random.randint(jax.random.key(1), (B, T + 1), 0, mc.vocab_size)
    batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:], weights=jnp.ones((B, T)),
                 positions=jnp.broadcast_to(jnp.arange(T), (B, T)),
                 segment_ids=jnp.ones((B, T), jnp.int32))
    return mc, params, st.compute_gradients(params, batch, cfg)


def _logit_step_effect(variant: str, mode: str, layout: str = "latent_heads"):
    """{site: (d shift, d entropy)} of a meta step on the per-token routing logits r.

    r and the goodness G are those of the fixed case's forward and SARS statistics; the step is
    along -grad_r of the variant's loss (``losses.site_meta_loss``, the function the engine
    differentiates), every token's logits free, so the measured direction is the variant's own
    and not mixed by prototypes shared between tokens."""
    mc, params, g = _case(variant, mode, layout=layout)
    stats = surprise.all_site_stats(params, g.aux, g.g_probes, mc)
    out = {}
    for site, router in losses.site_routers(params, mc).items():
        u, st_site = g.aux.steps.expert_input(site), stats[site]
        r0 = routing.prototype_scores(u, router.proto, router.gate)

        def loss(r, st_site=st_site, router=router):
            return jnp.sum(losses.site_meta_loss(r, st_site, router.mode, router.top_k,
                                                 variant))

        direction = -jax.grad(loss)(r0)

        def measures(eps, r0=r0, direction=direction, good=st_site.goodness):
            q = jax.nn.softmax(r0 + eps * direction, axis=-1)
            ent = -jnp.sum(q * jnp.log(q), axis=-1)
            return jnp.mean(jnp.sum(q * good, axis=-1)), jnp.mean(ent)

        _, (d_shift, d_ent) = jax.jvp(measures, (0.0,), (1.0,))
        out[site] = (float(d_shift), float(d_ent))
    return out


def _engine_matches_the_variant_loss(variant: str, mode: str, layout: str) -> None:
    """The engine's meta gradient is the gradient, through the routers, of the mean over steps,
    sites and valid tokens of ``site_meta_loss`` times ``w_meta``: the parameter step is the
    pull-back of the logit step above, with its sign."""
    mc, params, g = _case(variant, mode, layout=layout, w_meta=0.5)
    stats = surprise.all_site_stats(params, g.aux, g.g_probes, mc)
    routers = losses.site_routers(params, mc)
    leaves = {s: (r.proto, r.gate) for s, r in routers.items()}

    def reference(lv):
        per_site = []
        for site, router in routers.items():
            u = g.aux.steps.expert_input(site)  # (S, B, T[, H], D)
            r = routing.prototype_scores(u, *lv[site])
            per_tok = losses.site_meta_loss(r, stats[site], router.mode, router.top_k, variant)
            per_site.append(jnp.mean(per_tok, axis=tuple(range(1, per_tok.ndim))))  # (S,)
        return 0.5 * jnp.mean(jnp.stack(per_site))

    want = jax.grad(reference)(leaves)
    for site in routers:
        got_p, got_g = _router_grads(g.g_meta, site)
        np.testing.assert_allclose(got_p, want[site][0], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got_g, want[site][1], rtol=1e-4, atol=1e-7)


def _router_grads(tree: dict, site: str):
    if site == "ffn":
        return tree["block"]["ffn"]["proto"], tree["block"]["ffn"]["gate"]
    attn = tree["block"]["attn"]
    return attn[f"proto_{site}"], attn[f"gate_{site}"]


EPS = 1e-7  # the measured derivatives are >= 1e-6 in magnitude; float32 noise is far below


CASES = [(m, lay) for m in MODES for lay in LAYOUTS]


@pytest.mark.parametrize(("mode", "layout"), CASES)
def test_entropy_minus_moves_mass_away_from_good_experts(mode, layout):
    """The default (seed 000: prior = posterior - likelihood) sharpens r - G."""
    for site, (d_shift, _) in _logit_step_effect("entropy_minus", mode, layout).items():
        assert d_shift < -EPS, (site, d_shift)


@pytest.mark.parametrize(("mode", "layout"), CASES)
def test_entropy_plus_moves_mass_toward_good_experts(mode, layout):
    for site, (d_shift, _) in _logit_step_effect("entropy_plus", mode, layout).items():
        assert d_shift > EPS, (site, d_shift)


@pytest.mark.parametrize("mode", MODES)
def test_entropy_plain_sharpens_routing_whatever_the_goodness(mode):
    for site, (_, d_ent) in _logit_step_effect("entropy_plain", mode).items():
        assert d_ent < -EPS, (site, d_ent)
    # G plays no part: another importance definition changes G but not the meta gradient.
    g_attr = _case("entropy_plain", mode)[2].g_meta
    g_out = _case("entropy_plain", mode, importance="output_grad")[2].g_meta
    for a, b in zip(jax.tree.leaves(g_attr), jax.tree.leaves(g_out), strict=True):
        assert jnp.array_equal(a, b)


@pytest.mark.parametrize("variant", ["entropy_minus", "entropy_plus"])
@pytest.mark.parametrize(("mode", "layout"), CASES)
def test_engine_meta_gradient_is_the_variant_loss_gradient(variant, mode, layout):
    _engine_matches_the_variant_loss(variant, mode, layout)


def test_default_meta_loss_is_the_seed_sign():
    assert SarsConfig().meta_loss == "entropy_minus"


@pytest.mark.parametrize("mode", MODES)
def test_dyntrm_original_sharpens_the_live_goodness(mode):
    """The original's G(z) is not detached: the step lowers H(softmax(G(z))) with O and the
    per-unit-weight cost held at the forward's values (no fixed direction relative to G)."""
    mc, params, g = _case("dyntrm_original", mode)
    stats = surprise.all_site_stats(params, g.aux, g.g_probes, mc)
    for site in losses.site_routers(params, mc):
        u = g.aux.steps.expert_input(site)

        def objective(eps, site=site, u=u):
            p = jax.tree.map(lambda a, d: a - eps * d, params, g.g_meta)
            r = losses.site_routers(p, mc)[site]
            scores = routing.prototype_scores(u, r.proto, r.gate)
            return jnp.mean(losses.site_meta_loss(scores, stats[site], r.mode, r.top_k,
                                                  "dyntrm_original"))

        _, d_obj = jax.jvp(objective, (0.0,), (1.0,))
        assert float(d_obj) < -EPS, (site, float(d_obj))
