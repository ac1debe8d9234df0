"""Mixed precision (issue 8): params stay float32, compute runs in bfloat16, routing in float32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_model_config

from tinyonn_jax.config import Config, OptimizerConfig
from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.family import DYNTRM

B, T = 2, 8


def _batch():
    toks = jax.random.randint(jax.random.key(1), (B, T + 1), 8, 18)
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], weights=jnp.ones((B, T)),
                segment_ids=jnp.ones((B, T), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(T), (B, T)))


def test_bf16_compute_keeps_routing_and_logits_in_f32():
    f32 = tiny_model_config()
    bf16 = dataclasses.replace(f32, compute_dtype="bfloat16")
    params = modules.init_params(jax.random.key(0), f32)
    toks = _batch()["inputs"]
    l32, aux32 = tr.forward(params, toks, f32)
    l16, aux16 = tr.forward(params, toks, bf16)
    assert aux16.steps.hidden.dtype == jnp.bfloat16  # the residual stream is computed in bf16
    for site in f32.routed_sites:  # routing weights and decisions stay float32
        assert aux16.steps.site(site).z.dtype == jnp.float32
    assert l16.dtype == jnp.float32
    np.testing.assert_allclose(l16, l32, atol=0.1)  # bf16 rounding, not a different model


def test_bf16_train_step_updates_float32_params():
    cfg = Config(model=tiny_model_config(compute_dtype="bfloat16"),
                 optim=OptimizerConfig(name="adam", kwargs=()),
                 meta_optim=OptimizerConfig(name="adam", kwargs=()))
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    step = DYNTRM.make_train_step(cfg, opt)
    batch = _batch()
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["train/main_loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert int(state.skipped) == 0 and losses[-1] < losses[0]
    assert np.isfinite(float(m["sars/C_mean"])) and float(m["train/meta_loss"]) > 0


def test_bf16_remat_reuses_the_forward_routing():
    """Rematerialising a bf16 step gives the gradients of the same routing decisions."""
    base = tiny_model_config(compute_dtype="bfloat16")
    params = modules.init_params(jax.random.key(0), base)
    batch = _batch()

    def loss(p, cfg):
        logits, aux = tr.forward(p, batch["inputs"], cfg)
        return jnp.mean(logits ** 2), aux

    grads = {}
    for policy in ("none", "full"):
        cfg = dataclasses.replace(base, remat=policy)
        (_, aux), g = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params,
                                                                                        cfg)
        grads[policy] = (g, aux)
    for site in base.routed_sites:
        np.testing.assert_array_equal(grads["none"][1].steps.site(site).z > 0,
                                      grads["full"][1].steps.site(site).z > 0)
    for a, b in zip(jax.tree.leaves(grads["none"][0]), jax.tree.leaves(grads["full"][0]),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=2e-2, atol=2e-3)
