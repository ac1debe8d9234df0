"""Expert pool lifecycle (issue 7, seeds 003/004): remove, add, regenerate, optimizer reset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyonn_jax.config import Config, OptimizerConfig
from tinyonn_jax.families.dynonn import lifecycle, modules
from tinyonn_jax.families.dynonn import model as dynonn
from tinyonn_jax.families.dynonn.family import DYNONN

CFG = dynonn.DynOnnConfig(hidden=8, num_heads=2, head_dim=2, ffn_hidden=4, num_layers=2,
                     max_experts=4, init_experts=3, lifecycle_window=3)
update = jax.jit(lifecycle.lifecycle_update, static_argnums=3)


def _setup(cfg=CFG):
    params = modules.init_params(jax.random.key(0), cfg)
    for s in dynonn.SITES:  # non-zero thresholds, to see them reset
        params["layers"][s]["gates"] = jnp.full_like(params["layers"][s]["gates"], 0.25)
    adam = OptimizerConfig(name="adam", kwargs=())
    opt = DYNONN.build_optimizer(Config(family="dynonn", model=cfg, optim=adam, meta_optim=adam))
    opt_state = jax.tree.map(jnp.ones_like, opt.init(params))  # every moment 1: see resets
    pool = lifecycle.init_pool(cfg, jax.random.key(1))
    history = {s: jnp.ones_like(h) for s, h in pool.history.items()}
    return params, opt_state, pool._replace(history=history)


def _selected(site_masks: dict, path) -> np.ndarray | None:
    """The boolean slice mask of a leaf at ``path`` (None if not per-expert)."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if len(keys) < 3 or keys[-3] != "layers":
        return None
    ax = modules.expert_axes(CFG)["layers"].get(keys[-2], {}).get(keys[-1], -1)
    if ax < 0:
        return None
    m = np.asarray(site_masks.get(keys[-2], np.zeros((CFG.groups, CFG.max_experts), bool)))
    return m, ax


def _expand(m, ax, shape):
    out = [1] * len(shape)
    out[0], out[ax] = m.shape
    return np.broadcast_to(m.reshape(out), shape)


def _check_only(before, after, site_masks, *, inside):
    """Leaves equal outside the selected expert slices; inside, ``inside(old, new)`` holds."""
    flat_a = jax.tree_util.tree_flatten_with_path(after)[0]
    for (path, old), (_, new) in zip(jax.tree_util.tree_flatten_with_path(before)[0], flat_a,
                                     strict=True):
        old, new = np.asarray(old), np.asarray(new)
        sel = _selected(site_masks, path)
        m = np.zeros(old.shape, bool) if sel is None else _expand(sel[0], sel[1], old.shape)
        np.testing.assert_array_equal(new[~m], old[~m], err_msg=jax.tree_util.keystr(path))
        if m.any():
            assert inside(old[m], new[m], path), jax.tree_util.keystr(path)


def _mask(site, g, e):
    m = np.zeros((CFG.groups, CFG.max_experts), bool)
    m[g, e] = True
    return {site: m}


def test_remove_masks_exactly_the_dead_expert_and_resets_its_optimizer_state():
    params, opt_state, pool = _setup()
    pool = pool._replace(history={**pool.history,
                                  "ffn": pool.history["ffn"].at[:, 0, 1].set(0.0)})
    new_p, new_o, new_pool, plan = update(params, opt_state, pool, CFG)
    assert np.asarray(plan["remove"]["ffn"]).sum() == 1 and plan["remove"]["ffn"][0, 1]
    for kind in ("add", "regenerate"):
        assert not any(np.asarray(m).any() for m in plan[kind].values())
    expected = np.asarray(pool.live["ffn"]).copy()
    expected[0, 1] = False
    np.testing.assert_array_equal(new_pool.live["ffn"], expected)
    np.testing.assert_array_equal(new_pool.live["attn"], pool.live["attn"])
    _check_only(params, new_p, {}, inside=None)  # removal only masks
    _check_only(opt_state, new_o, _mask("ffn", 0, 1), inside=lambda o, n, p: np.all(n == 0))
    assert float(new_pool.history["ffn"][:, 0, 1].sum()) == 0
    events = lifecycle.events_from(plan, 40)
    assert events == [lifecycle.Event(40, "remove", 1, "ffn_0")]


def test_add_fills_the_first_free_slot_with_the_homeless_mean():
    params, opt_state, pool = _setup()
    v = jnp.arange(1.0, CFG.hidden + 1.0)
    pool = pool._replace(homeless_count={**pool.homeless_count,
                                         "attn": jnp.array([0.0, 5.0])},
                         homeless_sum={**pool.homeless_sum,
                                       "attn": pool.homeless_sum["attn"].at[1].set(v)})
    new_p, new_o, new_pool, plan = update(params, opt_state, pool, CFG)
    assert lifecycle.events_from(plan, 7) == [lifecycle.Event(7, "add", 3, "attn_1")]
    assert bool(new_pool.live["attn"][1, 3]) and int(lifecycle.num_live(new_pool)) == 13
    attn = new_p["layers"]["attn"]
    np.testing.assert_allclose(attn["proto_sim"][1, :, 3], v / jnp.linalg.norm(v), rtol=1e-6)
    assert float(attn["gates"][1, 3]) == 0.0
    _check_only(params, new_p, _mask("attn", 1, 3),
                inside=lambda o, n, p: not np.array_equal(o, n))
    _check_only(opt_state, new_o, _mask("attn", 1, 3), inside=lambda o, n, p: np.all(n == 0))
    assert all(float(c.sum()) == 0 for c in new_pool.homeless_count.values())


def test_regenerate_reinitialises_dead_experts_in_place():
    cfg = dataclasses.replace(CFG, regenerate=True)
    params, opt_state, pool = _setup(cfg)
    pool = pool._replace(history={**pool.history,
                                  "ffn": pool.history["ffn"].at[:, 1, 2].set(0.0)})
    new_p, new_o, new_pool, plan = update(params, opt_state, pool, cfg)
    assert lifecycle.events_from(plan, 3) == [lifecycle.Event(3, "regenerate", 2, "ffn_1")]
    np.testing.assert_array_equal(new_pool.live["ffn"], pool.live["ffn"])  # stays live
    ffn = new_p["layers"]["ffn"]
    assert float(ffn["gates"][1, 2]) == 0.0
    np.testing.assert_allclose(jnp.linalg.norm(ffn["proto_sim"][1, :, 2]), 1.0, rtol=1e-5)
    _check_only(params, new_p, _mask("ffn", 1, 2),
                inside=lambda o, n, p: not np.array_equal(o, n))
    _check_only(opt_state, new_o, _mask("ffn", 1, 2), inside=lambda o, n, p: np.all(n == 0))


def test_no_verdict_without_traffic():
    params, opt_state, pool = _setup()
    pool = pool._replace(history=jax.tree.map(jnp.zeros_like, pool.history))
    _, _, new_pool, plan = update(params, opt_state, pool, CFG)
    assert not any(np.asarray(m).any() for k in plan.values() for m in k.values())
    np.testing.assert_array_equal(new_pool.live["ffn"], pool.live["ffn"])


def test_routing_window_keeps_the_last_steps():
    pool = lifecycle.init_pool(CFG, jax.random.key(0))
    g, e, d = CFG.groups, CFG.max_experts, CFG.hidden
    for i in range(1, 6):  # window 3: steps 3, 4, 5 remain
        recs = {s: (jnp.full((g, e), float(i)), jnp.ones((g, d)), jnp.full((g,), 2.0))
                for s in dynonn.SITES}
        pool = lifecycle.record(pool, recs)
    np.testing.assert_allclose(lifecycle.records(pool)["attn"], 12.0)
    np.testing.assert_allclose(pool.homeless_count["ffn"], 10.0)
    assert int(pool.cursor) == 5


@pytest.mark.parametrize("names", [None, dynonn.EXPERT_WEIGHTS])
def test_map_expert_slices_on_gradients(names):
    params, _, _ = _setup()
    grads = jax.tree.map(jnp.ones_like, params)
    out = lifecycle.map_expert_slices(grads, _mask("attn", 0, 2),
                                      lambda s, n, x: jnp.zeros_like(x), CFG, names=names)
    assert float(out["layers"]["attn"]["wo"][0, 2].sum()) == 0
    assert float(out["layers"]["attn"]["wo"][1, 2].min()) == 1
    assert float(out["layers"]["ffn"]["w1"].min()) == 1
    gates_zeroed = float(out["layers"]["attn"]["gates"][0, 2]) == 0
    assert gates_zeroed == (names is None or "gates" in names)
    assert float(out["layers"]["attn"]["gate_log_scale"].min()) == 1  # no expert axis
    proto = np.asarray(out["layers"]["attn"]["proto_sim"])  # (G, D, E): expert axis 2
    assert proto[0, :, 2].max() == (0.0 if names is None else 1.0)
    assert proto[0, :, [0, 1, 3]].min() == 1 and proto[1].min() == 1


def test_add_prefers_a_slot_that_was_free_over_a_just_removed_one():
    params, opt_state, pool = _setup()
    pool = pool._replace(history={**pool.history,
                                  "ffn": pool.history["ffn"].at[:, 0, 1].set(0.0)},
                         homeless_count={**pool.homeless_count, "ffn": jnp.array([3.0, 0.0])})
    _, _, new_pool, plan = update(params, opt_state, pool, CFG)
    assert lifecycle.events_from(plan, 1) == [lifecycle.Event(1, "remove", 1, "ffn_0"),
                                              lifecycle.Event(1, "add", 3, "ffn_0")]
    np.testing.assert_array_equal(new_pool.live["ffn"][0], [True, False, True, True])
