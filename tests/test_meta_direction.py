"""Which way a SARS meta step moves routing probability mass, per meta-loss variant.

On a fixed small DynTRM, the family's own gradient pass gives the meta gradient and the per-token
goodness G of every routed site. A meta step is an infinitesimal SGD step along ``-g_meta``; its
effect is the exact directional derivative (``jax.jvp``) of

  shift   = mean over (step, token[, head]) of sum_p softmax(r)_p * G_p   (mass on good experts)
  entropy = mean routing entropy H(softmax(r))

with r the routing logits recomputed from the forward's expert inputs. Since sum_p softmax(r)_p
is 1, a step that moves mass toward high-goodness experts has d shift > 0. A sign error in the
goodness, in a variant or in how the engine applies it flips a sign below.
"""

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_model_config

from tinyonn_jax.config import Config, SarsConfig
from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm import step as st
from tinyonn_jax.families.dyntrm.sars import losses, surprise
from tinyonn_jax.nn import routing

B, T = 2, 8
MODES = ("capr", "topk")


def _case(variant: str, mode: str, importance: str = "attribution"):
    mc = tiny_model_config(attn_routing=mode, ffn_routing=mode, init_std=0.05)
    cfg = Config(family="dyntrm", model=mc,
                 sars=SarsConfig(meta_loss=variant, importance=importance))
    params = modules.init_params(jax.random.key(0), mc)
    toks = jax.random.randint(jax.random.key(1), (B, T + 1), 0, mc.vocab_size)
    batch = dict(inputs=toks[:, :-1], targets=toks[:, 1:], weights=jnp.ones((B, T)),
                 positions=jnp.broadcast_to(jnp.arange(T), (B, T)),
                 segment_ids=jnp.ones((B, T), jnp.int32))
    return mc, params, st.compute_gradients(params, batch, cfg)


def _step_effect(variant: str, mode: str) -> dict[str, tuple[float, float]]:
    """{site: (d shift, d entropy)} of a meta step along -g_meta."""
    mc, params, g = _case(variant, mode)
    stats = surprise.all_site_stats(params, g.aux, g.g_probes, mc)
    out = {}
    for site in losses.site_routers(params, mc):
        u, good = g.aux.steps.expert_input(site), stats[site].goodness

        def measures(eps, site=site, u=u, good=good):
            p = jax.tree.map(lambda a, d: a - eps * d, params, g.g_meta)
            r = losses.site_routers(p, mc)[site]
            q = jax.nn.softmax(routing.prototype_scores(u, r.proto, r.gate), axis=-1)
            ent = -jnp.sum(q * jnp.log(q), axis=-1)
            return jnp.mean(jnp.sum(q * good, axis=-1)), jnp.mean(ent)

        _, (d_shift, d_ent) = jax.jvp(measures, (0.0,), (1.0,))
        out[site] = (float(d_shift), float(d_ent))
    return out


EPS = 1e-7  # the measured derivatives are >= 1e-6 in magnitude; float32 noise is far below


@pytest.mark.parametrize("mode", MODES)
def test_entropy_minus_moves_mass_away_from_good_experts(mode):
    """The default (seed 000: prior = posterior - likelihood) sharpens r - G."""
    for site, (d_shift, _) in _step_effect("entropy_minus", mode).items():
        assert d_shift < -EPS, (site, d_shift)


@pytest.mark.parametrize("mode", MODES)
def test_entropy_plus_moves_mass_toward_good_experts(mode):
    for site, (d_shift, _) in _step_effect("entropy_plus", mode).items():
        assert d_shift > EPS, (site, d_shift)


@pytest.mark.parametrize("mode", MODES)
def test_entropy_plain_sharpens_routing_whatever_the_goodness(mode):
    for site, (_, d_ent) in _step_effect("entropy_plain", mode).items():
        assert d_ent < -EPS, (site, d_ent)
    # G plays no part: another importance definition changes G but not the meta gradient.
    g_attr = _case("entropy_plain", mode)[2].g_meta
    g_out = _case("entropy_plain", mode, importance="output_grad")[2].g_meta
    for a, b in zip(jax.tree.leaves(g_attr), jax.tree.leaves(g_out), strict=True):
        assert jnp.array_equal(a, b)


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

        _, d = jax.jvp(objective, (0.0,), (1.0,))
        assert float(d) < -EPS, (site, float(d))
