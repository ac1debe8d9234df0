"""Baselines and TRM options (issue 10): dense twin, routing off, deep supervision, EMA, warm-up."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from tinyonn_jax import loss as task_loss
from tinyonn_jax import optim, train_state
from tinyonn_jax.config import Config, ModelConfig, OptimizerConfig, SarsConfig, TrainConfig
from tinyonn_jax.families.dyntrm import dense, modules, recursion
from tinyonn_jax.families.dyntrm import step as st
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.family import DYNTRM
from tinyonn_jax.nn import context
from tinyonn_jax.nn.variables import MAIN

T = 8
_forward = jax.jit(tr.forward, static_argnames="cfg")  # compiled once per config, across tests


def _batch(cfg: ModelConfig, b: int = 2, t: int = T, seed: int = 1) -> dict:
    toks = jax.random.randint(jax.random.key(seed), (b, t + 1), 8, cfg.vocab_size)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": jnp.ones((b, t)),
            "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}


def _dense_cfg(**kw) -> ModelConfig:
    return tiny_model_config(attn_kind="mha", ffn_kind="swiglu", **kw)


@pytest.mark.parametrize("use_ffn", [True, False])
def test_match_param_count_within_5_percent(use_ffn):
    routed = (tiny_model_config(hidden=64, num_heads=4, num_attn_experts=16, num_ffn_experts=8)
              if use_ffn else ModelConfig(use_ffn=False))  # attention-only: the default width
    twin = dense.match_param_count(routed)
    assert (twin.attn_kind, twin.ffn_kind) == ("mha", "swiglu")
    assert twin.max_refinement_steps == routed.max_refinement_steps
    if use_ffn:
        assert twin.hidden == routed.hidden
    ratio = dense.param_count(twin) / dense.param_count(routed)
    assert abs(ratio - 1.0) <= 0.05, ratio
    real = tr.count_params(modules.init_params(jax.random.key(0), twin))
    assert real == dense.param_count(twin)


def test_dense_twin_has_no_routing_params_or_residuals():
    cfg = _dense_cfg()
    params = modules.init_params(jax.random.key(0), cfg)
    assert set(jax.tree.leaves(modules.param_labels(cfg))) == {MAIN}
    _, aux = _forward(params, _batch(cfg)["inputs"], cfg=cfg)
    assert not aux.steps.routed() and aux.steps.u_attn is None and aux.steps.u_ffn is None
    assert aux.steps.logits.shape == (cfg.max_refinement_steps, 2, T, cfg.vocab_size)


def test_routing_off_gives_exactly_uniform_weights():
    cfg = tiny_model_config(attn_routing="dense", ffn_routing="dense")
    params = modules.init_params(jax.random.key(0), cfg)
    _, aux = _forward(params, _batch(cfg)["inputs"], cfg=cfg)
    for site in cfg.routed_sites:
        pool = cfg.num_ffn_experts if site == "ffn" else cfg.num_attn_experts
        z = np.asarray(aux.steps.site(site).z)
        assert z.shape[-1] == pool
        assert np.all(z == np.float32(1.0 / pool))
        assert np.all(np.asarray(aux.steps.site(site).k) == pool)


def test_deep_supervision_last_step_only_equals_final_loss():
    cfg = tiny_model_config(max_refinement_steps=3)
    params = modules.init_params(jax.random.key(0), cfg)
    b = _batch(cfg)
    b["weights"] = b["weights"].at[0, :3].set(0.0)
    logits, aux = _forward(params, b["inputs"], cfg=cfg)
    final = task_loss.cross_entropy(logits, b["targets"], b["weights"])
    ds = task_loss.deep_supervision_loss(aux.steps.logits, b["targets"], b["weights"], (0, 0, 1))
    np.testing.assert_allclose(ds, final, rtol=1e-6)
    per_step = [task_loss.cross_entropy(aux.steps.logits[s], b["targets"], b["weights"])
                for s in range(3)]
    uniform = task_loss.deep_supervision_loss(aux.steps.logits, b["targets"], b["weights"],
                                              (2, 2, 2))
    np.testing.assert_allclose(uniform, np.mean(per_step), rtol=1e-6)

    # Through the training objective: (0, 0, 1) gives exactly the default loss.
    objective = jax.jit(lambda p, c: st.main_objective(p, None, b, c)[0], static_argnums=1)
    full = Config(model=cfg)
    ds_cfg = dataclasses.replace(full, train=TrainConfig(deep_supervision=(0.0, 0.0, 1.0)))
    np.testing.assert_allclose(objective(params, ds_cfg), objective(params, full), rtol=1e-6)


def test_deep_supervision_validation():
    with pytest.raises(ValueError, match="deep_supervision"):
        TrainConfig(deep_supervision=(0.0, -1.0))
    with pytest.raises(ValueError, match="deep_supervision"):
        TrainConfig(deep_supervision=(0.0, 0.0))
    assert TrainConfig(deep_supervision=[0, 1]).deep_supervision == (0, 1)
    with pytest.raises(ValueError, match="train.deep_supervision.*max_refinement_steps=2"):
        task_loss.deep_supervision_weights((1.0, 1.0, 1.0), 2)


@pytest.mark.parametrize("field,value", [("attn_kind", "linear"), ("ffn_kind", "geglu"),
                                         ("swiglu_hidden", -1)])
def test_bad_baseline_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{field: value})


def test_ema_update_equals_formula():
    decay = 0.9
    cfg = Config(model=tiny_model_config(), train=TrainConfig(ema_decay=decay),
                 sars=SarsConfig(enabled=False))  # EMA does not depend on SARS; compiles faster
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    assert state.ema is not None
    jax.tree.map(np.testing.assert_array_equal, state.ema, state.params)
    step = DYNTRM.make_train_step(cfg, opt, donate=False)
    batch = _batch(cfg.model)
    for _ in range(2):
        new, _ = step(state, batch)
        expect = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema, new.params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     new.ema, expect)
        state = new
    assert train_state.eval_params(state) is state.ema
    off = Config(model=tiny_model_config())
    state_off = DYNTRM.init_state(off, opt, jax.random.key(0))
    assert state_off.ema is None and train_state.eval_params(state_off) is state_off.params
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_warmup_schedule_values():
    oc = OptimizerConfig(name="sgd", learning_rate=0.1, warmup_steps=4, kwargs=())
    sched = optim.learning_rate(oc)
    got = [float(sched(i)) for i in range(7)]
    np.testing.assert_allclose(got, [0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1], rtol=1e-6)
    # The chain applies it: plain SGD updates are -lr_t * g.
    chain = optim.build_chain(oc)
    params = {"w": jnp.ones((3,))}
    grads = {"w": jnp.full((3,), 2.0)}
    opt_state = chain.init(params)
    for i in range(6):
        upd, opt_state = chain.update(grads, opt_state, params)
        np.testing.assert_allclose(upd["w"], -2.0 * got[i], rtol=1e-6, atol=1e-9)
    cos = optim.learning_rate(dataclasses.replace(oc, schedule="cosine", decay_steps=10))
    np.testing.assert_allclose([float(cos(i)) for i in (2, 4, 9, 14)],
                               [0.05, 0.1, 0.1 * 0.5 * (1 + np.cos(np.pi * 0.5)), 0.0],
                               rtol=1e-5, atol=1e-7)


def test_dense_twin_loss_falls_on_fixed_batch():
    cfg = Config(model=_dense_cfg(), optim=OptimizerConfig(learning_rate=3e-3))
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    step = DYNTRM.make_train_step(cfg, opt)
    batch = _batch(cfg.model, b=2, t=16)
    losses = []
    for _ in range(40):
        state, m = step(state, batch)
        losses.append(float(m["train/main_loss"]))
    assert "sars/C_mean" not in m and "route/avg_k/q" not in m
    assert float(m["train/grad_norm_meta"]) == 0.0
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("kinds", [("mha", "swiglu"), ("mha", "dynmoe"), ("dynsiha", "swiglu")])
def test_dense_kinds_are_causal(kinds):
    cfg = tiny_model_config(attn_kind=kinds[0], ffn_kind=kinds[1])
    params = modules.init_params(jax.random.key(0), cfg)
    tokens = _batch(cfg, b=1, t=6)["inputs"]
    ctx = context.make_context(tokens)
    readout = tr.make_readout(cfg)

    def logits_from_x(x):
        return recursion.refine(params, x, ctx, cfg, None, readout)[1].logits[-1]

    jac = jax.jacrev(logits_from_x)(tr.embed(params, tokens, cfg))  # (1,T,V, 1,T,D)
    dep = np.asarray(jnp.abs(jac).sum(axis=(2, 5))[0, :, 0, :])  # (T_out, T_in)
    later = np.triu(np.ones((6, 6), bool), k=1)
    assert np.all(dep[later] == 0.0)
    assert np.all(dep[~later] > 0.0)


@pytest.mark.parametrize("attn_kind,ffn_kind,sites", [
    ("mha", "swiglu", ()), ("mha", "dynmoe", ("ffn",)), ("dynsiha", "swiglu", ("attn",))])
def test_sars_covers_only_existing_sites(attn_kind, ffn_kind, sites):
    model = tiny_model_config(attn_kind=attn_kind, ffn_kind=ffn_kind)
    assert model.routed_sites == sites
    cfg = Config(model=model)
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    _, m = DYNTRM.make_train_step(cfg, opt, donate=False)(state, _batch(cfg.model))
    assert {k.removeprefix("sars/C_mean/") for k in m if k.startswith("sars/C_mean/")} == \
        set(sites)
    assert (float(m["train/grad_norm_meta"]) > 0.0) == bool(sites)


def test_kv_cache_generation_of_dense_twin_equals_full_recompute(monkeypatch):
    from test_generate import NEW, _check_against_reference, _model, _prompts

    cfg = _dense_cfg(rope="rope1d")
    _, ref = _check_against_reference(_model(cfg), cfg, _prompts(cfg), NEW)
    assert [len(r) for r in ref] == [NEW, NEW]

