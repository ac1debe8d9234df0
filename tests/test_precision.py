"""Mixed precision: params stay float32, compute runs in bfloat16, routing in float32 at
``Precision.HIGHEST``; ``compute_dtype="auto"`` is bfloat16 on gpu/tpu and float32 on cpu."""

import dataclasses

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_FAMILY_CONFIGS, tiny_batch, tiny_model_config

from tinyonn_jax import backend
from tinyonn_jax.config import Config, DynOnnConfig, ModelConfig, OptimizerConfig, SplConfig
from tinyonn_jax.errors import ConfigError
from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.family import DYNTRM
from tinyonn_jax.families.registry import get_family
from tinyonn_jax.families.spl import model as spl_model

B, T = 2, 8


def _batch():
    toks = jax.random.randint(jax.random.key(1), (B, T + 1), 8, 18)
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], weights=jnp.ones((B, T)),
                segment_ids=jnp.ones((B, T), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(T), (B, T)))


def test_bf16_compute_keeps_routing_and_logits_in_f32():
    f32 = tiny_model_config(compute_dtype="float32")
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


@pytest.mark.parametrize("name, expected", [
    ("cpu", jnp.float32), ("cuda", jnp.bfloat16), ("rocm", jnp.bfloat16), ("gpu", jnp.bfloat16),
    ("tpu", jnp.bfloat16)])
def test_auto_compute_dtype_resolves_per_platform(name, expected):
    assert backend.compute_dtype("auto", name) == expected
    assert backend.compute_dtype("float32", name) == jnp.float32  # explicit names win
    assert backend.compute_dtype("bfloat16", name) == jnp.bfloat16


@pytest.mark.parametrize("section", [ModelConfig, SplConfig, DynOnnConfig])
def test_every_family_defaults_to_auto_and_names_a_bad_dtype(section):
    assert section().compute_dtype == "auto"
    with pytest.raises(ConfigError, match=r"model\.compute_dtype"):
        section(compute_dtype="float16")


def test_auto_resolves_for_the_backend_that_traces():
    """float32 on a CPU host (the test configs keep their float32 tolerances), bfloat16 when
    the tests run on a GPU or TPU."""
    expected = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    assert tr.compute_dtype(tiny_model_config()) == expected
    assert TINY_FAMILY_CONFIGS["dynonn"].model.dtype == expected
    spl = TINY_FAMILY_CONFIGS["spl"]
    toks = tiny_batch(spl)["inputs"]
    params = get_family(spl).init_params(jax.random.key(0), spl)
    probes = spl_model.spl_zero_probes(spl.model, *toks.shape)
    _, aux = jax.eval_shape(lambda: spl_model.spl_forward(params, toks, spl.model, probes=probes))
    assert aux.residuals["q"].x.dtype == expected  # an SPL layer's input: the compute dtype
    assert aux.residuals["q"].raw.dtype == jnp.float32  # its routing
    with pytest.raises(ValueError, match="compute dtype"):
        backend.compute_dtype("float16")


# Where each family computes its routing scores u . proto (file suffix, function name).
ROUTERS = (("nn/routing.py", "prototype_scores"), ("nn/gamoe.py", "cosine"),
           ("spl/model.py", "spl_route"))


def _eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations (scan, jit, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jex.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jex.Jaxpr):
                    yield from _eqns(sub)


def _is_router(eqn) -> bool:
    frames = eqn.source_info.traceback.frames if eqn.source_info.traceback else ()
    return any(f.file_name.endswith(path) and f.function_name == fn
               for f in frames for path, fn in ROUTERS)


def _bf16(cfg: Config) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                              compute_dtype="bfloat16"))


@pytest.mark.parametrize("family", sorted(TINY_FAMILY_CONFIGS))
def test_router_matmuls_run_at_highest_precision_in_bf16(family):
    """The jaxpr of a bf16 train step (forward and backward): every dot_general of a router is
    float32 x float32 at Precision.HIGHEST, the others compute in bfloat16 at the default
    precision (the test session's global "highest" is switched off while tracing)."""
    cfg = _bf16(TINY_FAMILY_CONFIGS[family])
    fam = get_family(cfg)
    opt = fam.build_optimizer(cfg)
    state = fam.init_state(cfg, opt, jax.random.key(0))
    step = fam.make_train_step(cfg, opt, donate=False)
    with jax.default_matmul_precision("default"):
        jaxpr = jax.make_jaxpr(step)(state, tiny_batch(cfg))
    dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    routers = [e for e in dots if _is_router(e)]
    assert len(routers) >= 2  # forward and backward of at least one routing site
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for e in routers:
        assert e.params["precision"] == highest, e
        assert all(v.aval.dtype == jnp.float32 for v in e.invars), e
    others = [e for e in dots if not _is_router(e)]
    assert any(v.aval.dtype == jnp.bfloat16 for e in others for v in e.invars)
    assert all(e.params["precision"] != highest for e in others
               if any(v.aval.dtype == jnp.bfloat16 for v in e.invars))


# SPL without MoIE and PRC: its train step compiles in half the time, routing unchanged.
BF16_STEP_CONFIGS = {
    "spl": dataclasses.replace(TINY_FAMILY_CONFIGS["spl"], model=dataclasses.replace(
        TINY_FAMILY_CONFIGS["spl"].model, use_moie=False, prc=False)),
    "dynonn": TINY_FAMILY_CONFIGS["dynonn"],
}


@pytest.mark.parametrize("family", sorted(BF16_STEP_CONFIGS))
def test_bf16_train_step_of_every_family_keeps_float32_params(family):
    cfg = _bf16(BF16_STEP_CONFIGS[family])
    fam = get_family(cfg)
    opt = fam.build_optimizer(cfg)
    state = fam.init_state(cfg, opt, jax.random.key(0))
    step = fam.make_train_step(cfg, opt)
    batch = tiny_batch(cfg)
    losses = []
    for _ in range(3):
        state, m = step(state, batch)
        losses.append(float(m["train/main_loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert int(state.skipped) == 0 and np.all(np.isfinite(losses)), losses
