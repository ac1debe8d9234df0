"""DynONN (issue 7, seed 002): structure, bf16 inner/outer remat, 1f2b1o training, maintenance."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyonn_jax import loss as task_loss
from tinyonn_jax.config import OptimizerConfig
from tinyonn_jax.families.dynonn import model as dynonn
from tinyonn_jax.families.dynonn import step as ms

B, T = 2, 8
CFG = dynonn.DynOnnConfig(hidden=16, num_heads=2, head_dim=4, ffn_hidden=8, num_layers=2,
                     max_experts=4, init_experts=3, lifecycle_window=4, lifecycle_period=3)


def _batch(cfg, seed=0):
    toks = jax.random.randint(jax.random.key(seed + 7), (B, T + 1), 0, cfg.vocab_size)
    return dict(inputs=toks[:, :-1], targets=toks[:, 1:], weights=jnp.ones((B, T)),
                segment_ids=jnp.ones((B, T), jnp.int32),
                positions=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="init_experts"):
        dynonn.DynOnnConfig(max_experts=4, init_experts=5)
    with pytest.raises(ValueError, match="fallback"):
        dynonn.DynOnnConfig(fallback="maybe")
    with pytest.raises(ValueError, match="head_dim"):
        dynonn.DynOnnConfig(head_dim=3)


def test_recursion_equals_a_stack_of_identical_layers():
    rec = dataclasses.replace(CFG, structure="recursion")
    p_rec = dynonn.init_params(jax.random.key(0), rec)
    p_stack = {**p_rec, "layers": jax.tree.map(
        lambda a: jnp.broadcast_to(a, (CFG.num_layers, *a.shape[1:])), p_rec["layers"])}
    inputs = _batch(CFG)["inputs"]
    fwd = jax.jit(dynonn.moe_forward, static_argnums=2)
    a, aux_a = fwd(p_rec, inputs, rec)
    b, aux_b = fwd(p_stack, inputs, CFG)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(aux_a["ffn"]["mask"], aux_b["ffn"]["mask"])
    assert aux_a["attn"]["z"].shape == (CFG.num_layers, B, T, CFG.max_experts)


def test_bf16_remat_cannot_flip_a_routing_decision():
    """Gradients with remat in bf16 equal gradients with the forward's decisions held fixed
    (no remat): the backward used exactly the forward's masks. Flipping one decision changes
    them, so the comparison is sensitive."""
    cfg = dataclasses.replace(CFG, compute_dtype="bfloat16", remat=True)
    batch = _batch(cfg)
    params = dynonn.init_params(jax.random.key(1), cfg)

    @functools.partial(jax.jit, static_argnames="remat")
    def grads(params, decisions, remat):
        c = dataclasses.replace(cfg, remat=remat)

        def f(p):
            logits, aux = dynonn.moe_forward(p, batch["inputs"], c, decisions=decisions)
            return task_loss.cross_entropy(logits, batch["targets"], batch["weights"]), aux

        return jax.grad(f, has_aux=True)(params)

    g_remat, aux = grads(params, None, remat=True)
    dec = dynonn.decisions_of(aux)
    mask = np.asarray(dec["ffn"].mask)
    assert 0 < mask.mean() < 1
    assert aux["ffn"]["u"].dtype == jnp.bfloat16
    g_fixed, _ = grads(params, dec, remat=False)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g_remat)[0],
                            jax.tree.leaves(g_fixed), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # Sensitivity: one token of layer 0 routed differently changes the gradients.
    flipped = mask.copy()
    t = int(np.argmax(mask[0, 0, :].sum(-1) >= 2))  # a token with two routed experts
    e = int(np.argmax(mask[0, 0, t]))
    flipped[0, 0, t, e] = False
    dec_f = {**dec, "ffn": dec["ffn"]._replace(mask=jnp.asarray(flipped))}
    g_flip, _ = grads(params, dec_f, remat=False)
    diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in zip(jax.tree.leaves(g_flip), jax.tree.leaves(g_fixed), strict=True))
    assert diff > 1e-4


@pytest.fixture(scope="module")
def trainer():
    params = dynonn.init_params(jax.random.key(0), CFG)
    adam = OptimizerConfig(name="adam", kwargs=(), learning_rate=1e-2)
    opt = ms.build_moe_optimizer(params, adam, adam)
    return opt, ms.make_moe_train_step(CFG, opt)


def test_main_loss_falls_on_a_fixed_batch(trainer):
    opt, step = trainer
    state = ms.init_moe_state(CFG, opt, jax.random.key(0))
    batch = _batch(CFG)
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["train/main_loss"]))
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
    assert int(state.step) == 30 and int(state.skipped) == 0
    for k in ("train/gating_loss", "gate/loss_balance", "gate/loss_smk", "gate/lambda",
              "gate/gating_acc", "sars/pi_score", "sars/surprise", "train/tau",
              "route/avg_k/attn", "route/avg_k/ffn", "experts/num_experts", "train/token_acc"):
        assert m[k].shape == () and np.isfinite(float(m[k])), k
    assert m["experts/usage_ffn"].shape == (CFG.max_experts,)
    usage, live = ms.expert_rows(m)
    assert set(usage) == set(live) == {"attn_0", "attn_1", "ffn_0", "ffn_1"}
    assert usage["attn_1"].shape == (CFG.max_experts,) and live["ffn_0"].sum() == 3
    assert int(m["experts/num_experts"]) == 2 * CFG.groups * CFG.init_experts
    assert 1.0 <= float(m["route/avg_k/ffn"]) <= CFG.init_experts
    assert int(state.pool.cursor) == 30


def _set_gates(state, site, group, experts, value):
    layers = state.params["layers"]
    gates = layers[site]["gates"].at[group, jnp.asarray(experts)].set(value)
    layers = {**layers, site: {**layers[site], "gates": gates}}
    return state._replace(params={**state.params, "layers": layers})


def test_maintain_adds_removes_and_regenerates(trainer):
    opt, step = trainer
    state = ms.init_moe_state(CFG, opt, jax.random.key(0))
    batch = _batch(CFG, seed=3)
    # ffn_0 expert 1 can never pass its threshold (cos <= 1 < 3) nor win the fallback;
    # attn_1 live experts are all out of reach: its tokens become homeless.
    state = _set_gates(state, "ffn", 0, [1], 3.0)
    state = _set_gates(state, "attn", 1, [0, 1, 2], 1.01)
    for _ in range(3):
        state, m = step(state, batch)
    assert float(m["route/homeless/attn"]) > 0
    state, none = ms.maintain(state, CFG, 2)
    assert none == []  # not due
    state, events = ms.maintain(state, CFG, 3)
    kinds = {(e.kind, e.site, e.expert_id) for e in events}
    assert ("remove", "ffn_0", 1) in kinds and ("add", "attn_1", 3) in kinds, events
    assert all(e.step == 3 for e in events)
    assert not bool(state.pool.live["ffn"][0, 1]) and bool(state.pool.live["attn"][1, 3])
    # Regeneration: ffn_1 expert 0 goes silent for a whole window, then is re-initialised.
    state = _set_gates(state, "ffn", 1, [0], 3.0)
    for _ in range(CFG.lifecycle_window):
        state, m = step(state, batch)
    state, events = ms.maintain(state, dataclasses.replace(CFG, regenerate=True), 7,
                                force=True)
    kinds = {(e.kind, e.site, e.expert_id) for e in events}
    assert ("regenerate", "ffn_1", 0) in kinds, events
    assert not any(e.kind == "remove" for e in events)
    assert float(state.params["layers"]["ffn"]["gates"][1, 0]) == 0.0
    assert bool(state.pool.live["ffn"][1, 0])
    state, m = step(state, batch)
    assert np.isfinite(float(m["train/main_loss"]))
