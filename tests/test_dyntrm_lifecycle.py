"""Expert lifecycle of DynTRM (seeds 003, 004): live masks over fixed pools, remove, regenerate
and add, optimizer resets, the metrics it changes, the trainer's events and checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from tinyonn_jax.config import Config, OptimizerConfig
from tinyonn_jax.families.dyntrm import lifecycle, modules
from tinyonn_jax.families.dyntrm import step as st
from tinyonn_jax.families.dyntrm.family import DYNTRM
from tinyonn_jax.families.dyntrm.sars import losses, surprise
from tinyonn_jax.nn import routing
from tinyonn_jax.nn.lifecycle import Event

LAYOUTS = ("latent_heads", "qkv_routers")
ADAM = OptimizerConfig(name="adam", learning_rate=1e-3, kwargs=())
update = jax.jit(lifecycle.lifecycle_update, static_argnums=4)


def _cfg(layout: str = "qkv_routers", **kw) -> Config:
    base = dict(attn_layout=layout, ffn_mult=1, lifecycle_period=2, lifecycle_window=2)
    base.update(kw)
    return Config(model=tiny_model_config(**base), optim=ADAM, meta_optim=ADAM)


def _batch(cfg: Config, b: int = 2, t: int = 8) -> dict:
    """Random tokens; the last two slots of row 1 are padding."""
    toks = jax.random.randint(jax.random.key(1), (b, t + 1), 8, cfg.model.vocab_size)
    seg = jnp.ones((b, t), jnp.int32).at[1, -2:].set(0)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": (seg > 0) * 1.0,
            "segment_ids": seg,
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}


def _pool_leaves(cfg, params: dict, pool: str) -> dict:
    """{path: (leaf, expert axis)} of the pool's per-expert parameters, from the declared axes
    (read here independently of the lifecycle's own slice table)."""
    axes = modules.expert_axes(cfg.model)["block"][pool]
    flat = jax.tree_util.tree_flatten_with_path(axes)[0]
    out = {}
    for path, ax in flat:
        if ax >= 0:
            keys = tuple(k.key for k in path)
            leaf = params["block"][pool]
            for k in keys:
                leaf = leaf[k]
            out[keys] = (np.asarray(leaf), ax)
    return out


def _slot(x: np.ndarray, ax: int, e: int) -> np.ndarray:
    return np.take(x, e, axis=ax)


def _others(x: np.ndarray, ax: int, e: int) -> np.ndarray:
    return np.delete(x, e, axis=ax)


# ---- routing with a live mask ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["capr", "topk", "dense"])
def test_route_leaves_dead_experts_out(mode):
    u = jax.random.normal(jax.random.key(0), (6, 3, 8))
    proto = jax.random.normal(jax.random.key(1), (4, 8))
    gate = jnp.zeros((4,))
    live = jnp.array([True, False, True, True])
    r = routing.route(u, proto, gate, mode, 2, live=live)
    mask, z = np.asarray(r.mask), np.asarray(r.z)
    assert not mask[..., 1].any() and (z[..., 1] == 0).all()
    np.testing.assert_array_equal(r.k, mask.sum(-1))
    # The same routing as a pool of the three live experts only.
    keep = np.asarray(live)
    alone = routing.route(u, proto[keep], gate[keep], mode, 2)
    np.testing.assert_array_equal(mask[..., keep], alone.mask)
    np.testing.assert_allclose(z[..., keep], alone.z, rtol=1e-6, atol=0)
    if mode == "dense":
        np.testing.assert_allclose(z[..., keep], 1.0 / 3.0, rtol=1e-6)


def test_meta_entropy_is_the_entropy_over_live_experts():
    x = jax.random.normal(jax.random.key(0), (5, 4)) * 3.0
    live = jnp.array([True, True, False, True])
    np.testing.assert_allclose(losses.entropy(x, live), losses.entropy(x[:, np.asarray(live)]),
                               rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(losses.entropy(v, live)))(x)
    assert np.isfinite(np.asarray(g)).all()
    assert (np.asarray(g)[:, 2] == 0).all() and np.abs(np.asarray(g)[:, [0, 1, 3]]).sum() > 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("isolate", [True, False])
def test_dead_expert_gets_zero_weight_and_no_gradient(layout, isolate):
    cfg = _cfg(layout)
    cfg = cfg.replace_path("sars.isolate", isolate)
    params = modules.init_params(jax.random.key(0), cfg.model)
    dead = {"attn": 2, "ffn": 1}
    live = {p: jnp.arange(4) != e for p, e in dead.items()}
    g = jax.jit(st.compute_gradients, static_argnums=2)(params, _batch(cfg), cfg, live)
    for site, r in g.aux.steps.routed().items():
        e = dead[lifecycle.pool_of_site(site)]
        assert (np.asarray(r.z)[..., e] == 0).all() and not np.asarray(r.mask)[..., e].any()
        assert np.asarray(r.z).max() > 0
    for grads in (g.g_main, g.g_meta):
        for pool, e in dead.items():
            for path, (x, ax) in _pool_leaves(cfg, grads, pool).items():
                assert (_slot(x, ax, e) == 0).all(), (pool, path)
    # ... while the live experts learn: the test can fail.
    for pool in dead:
        main = _pool_leaves(cfg, g.g_main, pool)
        assert sum(np.abs(x).sum() for x, _ in main.values()) > 0
        meta = {p: v for p, v in _pool_leaves(cfg, g.g_meta, pool).items()
                if p[-1].startswith("proto")}
        assert sum(np.abs(x).sum() for x, _ in meta.values()) > 0


# ---- records and maintenance -----------------------------------------------------------------

def _homeless_brute_force(aux, valid: np.ndarray, cfg, pool: str):
    """Routed counts (P,), homeless input sum (Din,), homeless rows: loops over rows."""
    sites = [s for s in aux.steps.routed() if lifecycle.pool_of_site(s) == pool]
    masks = [np.asarray(aux.steps.site(s).mask) for s in sites]
    u = np.asarray(aux.steps.expert_input(sites[0]), np.float64)
    lead = masks[0].shape[:-1]  # (S, B, T[, H])
    counts = np.zeros(masks[0].shape[-1])
    hsum, rows = np.zeros(u.shape[-1]), 0
    for idx in np.ndindex(*lead):
        if not valid[idx[1], idx[2]]:
            continue
        chosen = [m[idx] for m in masks]
        counts += sum(c.astype(float) for c in chosen)
        if not np.any(chosen):
            hsum += u[idx] / np.linalg.norm(u[idx])
            rows += 1
    return counts, hsum, rows


def _raise_gates(params: dict, cfg, value: float) -> dict:
    """Every gate of the routed pools set to ``value``: fewer experts per token."""
    def f(path, x):
        keys = [k.key for k in path]
        return jnp.full_like(x, value) if keys[0] == "block" and keys[-1].startswith(
            "gate") else x

    return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_records_count_routed_tokens_and_homeless_inputs(layout):
    cfg = _cfg(layout, init_attn_experts=2, init_ffn_experts=2)
    params = _raise_gates(modules.init_params(jax.random.key(0), cfg.model), cfg, 0.3)
    pool = lifecycle.init_pool(cfg.model, jax.random.key(1))
    batch = _batch(cfg)
    g = st.compute_gradients(params, batch, cfg, pool.live)
    valid = np.asarray(batch["segment_ids"] > 0)
    recs = lifecycle.step_records(g.aux, jnp.asarray(valid, jnp.float32), cfg.model)
    for p in ("attn", "ffn"):
        counts, hsum, rows = _homeless_brute_force(g.aux, valid, cfg, p)
        assert 0 < rows < valid.sum() * cfg.model.max_refinement_steps * (
            cfg.model.num_heads if layout == "qkv_routers" and p == "attn" else 1), (p, rows)
        np.testing.assert_allclose(recs[p][0], counts, rtol=0, atol=0)
        np.testing.assert_allclose(recs[p][1], hsum, rtol=1e-5, atol=1e-5)
        assert float(recs[p][2]) == rows
        assert counts[2:].sum() == 0  # free slots are never routed
    ring = lifecycle.record(lifecycle.record(pool, recs), recs)
    np.testing.assert_allclose(ring.homeless_count["ffn"], 2 * float(recs["ffn"][2]))
    assert int(ring.cursor) == 2


def _setup(cfg, *, traffic: bool = True, gate: float = 0.25):
    """Params, Adam state with every moment 1 (to see resets), an EMA, and a pool whose
    window saw every expert routed (unless ``traffic`` is False)."""
    params = modules.init_params(jax.random.key(0), cfg.model)
    params = _raise_gates(params, cfg, gate)  # non-zero gates, to see them reset
    opt = DYNTRM.build_optimizer(cfg)
    opt_state = jax.tree.map(jnp.ones_like, opt.init(params))
    ema = jax.tree.map(lambda x: x + 1.0, params)
    pool = lifecycle.init_pool(cfg.model, jax.random.key(2))
    if traffic:
        pool = pool._replace(history={p: jnp.ones_like(h) for p, h in pool.history.items()})
    return params, opt_state, ema, pool


def _assert_only_slots(before, after, cfg, slots: dict, inside):
    """Every leaf equal outside the slots {pool: expert}; inside, ``inside(old, new)`` holds
    for every per-expert leaf of the slot's pool (matched by the parameter's path tail)."""
    axes = {}
    for pool in slots:
        for path, ax in jax.tree_util.tree_flatten_with_path(
                modules.expert_axes(cfg.model)["block"][pool])[0]:
            if ax >= 0:
                axes[("block", pool, *(k.key for k in path))] = (pool, ax)
    n_inside = 0
    flat_after = jax.tree_util.tree_flatten_with_path(after)[0]
    for (path, old), (_, new) in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                     flat_after, strict=True):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        hit = next((axes[keys[-n:]] for n in (5, 4, 3) if keys[-n:] in axes), None)
        old, new = np.asarray(old), np.asarray(new)
        if hit is None or old.ndim == 0:
            np.testing.assert_array_equal(new, old, err_msg=jax.tree_util.keystr(path))
            continue
        pool, ax = hit
        e = slots[pool]
        np.testing.assert_array_equal(_others(new, ax, e), _others(old, ax, e),
                                      err_msg=jax.tree_util.keystr(path))
        assert inside(_slot(old, ax, e), _slot(new, ax, e), keys), jax.tree_util.keystr(path)
        n_inside += 1
    assert n_inside > 0


@pytest.mark.parametrize("regenerate", [False, True])
def test_dead_expert_is_removed_or_regenerated_alone(regenerate):
    cfg = _cfg("qkv_routers", regenerate=regenerate)
    params, opt_state, ema, pool = _setup(cfg)
    pool = pool._replace(history={**pool.history, "ffn": pool.history["ffn"].at[:, 1].set(0)})
    new_p, new_o, new_e, new_pool, plan = update(params, opt_state, ema, pool, cfg.model)
    kind = "regenerate" if regenerate else "remove"
    assert lifecycle.events_from(plan, 6) == [Event(6, kind, 1, "ffn")]
    expected_live = np.ones(4, bool)
    expected_live[1] = regenerate
    np.testing.assert_array_equal(new_pool.live["ffn"], expected_live)
    np.testing.assert_array_equal(new_pool.live["attn"], pool.live["attn"])
    _assert_only_slots(opt_state, new_o, cfg, {"ffn": 1},
                       inside=lambda o, n, k: np.all(n == 0))
    if regenerate:  # fresh weights and prototype, gate 0; the average restarts there
        def fresh(o, n, k):
            return np.all(n == 0) if k[-1] == "gate" else not np.array_equal(o, n)

        _assert_only_slots(params, new_p, cfg, {"ffn": 1}, inside=fresh)
        _assert_only_slots(ema, new_e, cfg, {"ffn": 1}, inside=lambda o, n, k: True)
        for path, (x, ax) in _pool_leaves(cfg, new_e, "ffn").items():
            np.testing.assert_array_equal(_slot(x, ax, 1),
                                          _slot(_pool_leaves(cfg, new_p, "ffn")[path][0], ax, 1))
    else:  # removal only masks
        jax.tree.map(np.testing.assert_array_equal, params, new_p)
        jax.tree.map(np.testing.assert_array_equal, ema, new_e)
    assert float(new_pool.history["ffn"][:, 1].sum()) == 0
    assert float(new_pool.history["ffn"][:, 0].sum()) > 0


def test_no_verdict_without_traffic():
    cfg = _cfg("qkv_routers")
    params, opt_state, ema, pool = _setup(cfg, traffic=False)
    _, _, _, new_pool, plan = update(params, opt_state, ema, pool, cfg.model)
    assert lifecycle.events_from(plan, 2) == []
    jax.tree.map(np.testing.assert_array_equal, new_pool.live, pool.live)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_takes_the_first_free_slot_at_the_mean_of_homeless_inputs(layout):
    cfg = _cfg(layout, init_attn_experts=2, init_ffn_experts=3)
    params, opt_state, ema, pool = _setup(cfg, gate=0.5)  # high gates: homeless tokens
    # Records of a real step: which rows no expert took, and their inputs.
    batch = _batch(cfg)
    g = st.compute_gradients(params, batch, cfg, pool.live)
    valid = np.asarray(batch["segment_ids"] > 0)
    pool = lifecycle.record(pool, lifecycle.step_records(
        g.aux, jnp.asarray(valid, jnp.float32), cfg.model))
    new_p, new_o, new_e, new_pool, plan = update(params, opt_state, ema, pool, cfg.model)
    assert lifecycle.events_from(plan, 4) == [Event(4, "add", 2, "attn"),
                                              Event(4, "add", 3, "ffn")]
    slots = {"attn": 2, "ffn": 3}
    for p, e in slots.items():
        _, hsum, rows = _homeless_brute_force(g.aux, valid, cfg, p)
        assert rows > 0
        mean = hsum / np.linalg.norm(hsum)
        old = _pool_leaves(cfg, params, p)
        protos = {k: v for k, v in _pool_leaves(cfg, new_p, p).items() if k[-1].startswith(
            "proto")}
        assert protos
        live = np.asarray(pool.live[p])
        for path, (x, ax) in protos.items():  # (P, Din): the mean direction at the live length
            length = np.linalg.norm(old[path][0], axis=-1)[live].mean()
            np.testing.assert_allclose(_slot(x, ax, e), length * mean, rtol=1e-5, atol=1e-6)
        assert bool(new_pool.live[p][e])
        assert float(new_pool.homeless_count[p]) == 0

    def added(o, n, k):
        return np.all(n == 0) if k[-1].startswith("gate") else not np.array_equal(o, n)

    _assert_only_slots(params, new_p, cfg, slots, inside=added)
    _assert_only_slots(opt_state, new_o, cfg, slots, inside=lambda o, n, k: np.all(n == 0))
    # Adam's step count is shared by every parameter: kept.
    counts = [x for p, x in jax.tree_util.tree_flatten_with_path(new_o)[0]
              if "count" in jax.tree_util.keystr(p)]
    assert counts and all(np.all(np.asarray(c) == 1) for c in counts)
    assert int(lifecycle.num_live(new_pool)) == int(lifecycle.num_live(pool)) + 2


# ---- in training -----------------------------------------------------------------------------

@pytest.mark.parametrize("regenerate", [False, True])
def test_maintenance_acts_exactly_at_the_period(regenerate):
    cfg = _cfg("qkv_routers", lifecycle_period=3, lifecycle_window=3, regenerate=regenerate)
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    # FFN expert 1 is never chosen (its gate is far above any score): dead from the start.
    ffn = state.params["block"]["ffn"]
    state = state._replace(params={**state.params, "block": {
        **state.params["block"], "ffn": {**ffn, "gate": ffn["gate"].at[1].set(100.0)}}})
    train = DYNTRM.make_train_step(cfg, opt, donate=False)
    batch = _batch(cfg)
    seen, num, gate = {}, [], []
    for i in range(1, 5):
        state, m = train(state, batch)
        num.append(int(m["train/num_experts"]))
        before = float(state.params["block"]["ffn"]["gate"][1])
        state, seen[i] = DYNTRM.maintain(state, cfg, i)
        gate.append((before, float(state.params["block"]["ffn"]["gate"][1])))
    kind = "regenerate" if regenerate else "remove"
    assert seen == {1: [], 2: [], 3: [(3, kind, 1, "ffn")], 4: []}
    assert num == ([8, 8, 8, 8] if regenerate else [8, 8, 8, 7])
    if regenerate:
        assert gate[2][1] == 0.0 and gate[2][0] > 99.0
    else:  # removed: no gradient and zeroed Adam moments, so its parameters stay put
        assert gate[2][1] == gate[2][0] == gate[3][0] == gate[3][1]


def test_pool_only_when_needed_and_parameters_unchanged_by_it():
    on, off = _cfg(), _cfg(lifecycle_period=0)
    p_on, pool = DYNTRM.init(jax.random.key(0), on)
    p_off, none = DYNTRM.init(jax.random.key(0), off)
    assert none is None and isinstance(pool, lifecycle.PoolState)
    jax.tree.map(np.testing.assert_array_equal, p_on, p_off)
    assert DYNTRM.init(jax.random.key(0), _cfg(lifecycle_period=0, init_ffn_experts=2))[1]


def test_contract_metrics_and_gating_acc_against_the_statistics():
    cfg = _cfg("qkv_routers", init_ffn_experts=3)
    params, pool = DYNTRM.init(jax.random.key(0), cfg)
    batch = _batch(cfg)
    out = jax.jit(DYNTRM.gradients, static_argnums=3)(params, pool, batch, cfg)
    m = out.metrics
    g = st.compute_gradients(params, batch, cfg, pool.live)
    stats = surprise.all_site_stats(params, g.aux, g.g_probes, cfg.model)
    valid = np.asarray(batch["segment_ids"] > 0)
    hits = rows = 0
    for site, s in stats.items():
        r = g.aux.steps.site(site)
        mask, z, c = (np.asarray(a) for a in (r.mask, r.z, s.c))
        w = valid.reshape(1, *valid.shape, *([1] * (mask.ndim - 4)))
        inf = w & np.any(mask & (c > 0), axis=-1)
        same = (np.argmax(np.where(mask, z, -np.inf), -1)
                == np.argmin(np.where(mask, c, np.inf), -1))
        hits, rows = hits + np.sum(same & inf), rows + np.sum(inf)
    assert 0 < hits < rows
    np.testing.assert_allclose(m["train/gating_acc"], hits / rows, rtol=1e-6)
    assert m["train/gating_loss"] == m["train/meta_loss"]
    assert m["train/pi_score"] == m["sars/pi_score"] and m["train/surprise"] == m["sars/surprise"]
    np.testing.assert_allclose(m["train/avg_k"], np.mean(
        [m[f"route/avg_k/{s}"] for s in ("q", "k", "v", "ffn")]), rtol=1e-6)
    assert int(m["train/num_experts"]) == 4 + 3 == int(m["experts/num_experts"])
    assert int(m["experts/num_experts/ffn"]) == 3
    usage, live = DYNTRM.expert_rows({k: v for k, v in m.items() if np.ndim(v) == 1})
    assert set(usage) == set(live) == {"attn", "ffn"}
    np.testing.assert_array_equal(live["ffn"], [True, True, True, False])
    assert usage["ffn"][3] == 0


def test_trainer_logs_lifecycle_events(tmp_path):
    from test_trainer import _micro_cfg

    from tinyonn_jax import trainer

    cfg = _micro_cfg(**{"model.lifecycle_period": 2, "model.lifecycle_window": 2,
                        "model.init_attn_experts": 4, "model.init_ffn_experts": 2,
                        "train.ckpt_every": 4})
    trainer.run(cfg, tmp_path, quiet=True)
    events = [json.loads(x) for x in
              (tmp_path / "logs" / "lifecycle.jsonl").read_text().splitlines()]
    assert events and all(e["step"] in (2, 4) and e["site"] in ("attn", "ffn") for e in events)
    state, _, _ = trainer.restore_train_state(tmp_path)
    for pool, size in (("attn", 4), ("ffn", 2)):  # replay the log onto the initial masks
        live = np.arange(len(state.extras.live[pool])) < size
        for e in (e for e in events if e["site"] == pool):
            live[e["expert"]] = e["kind"] != "remove"
        np.testing.assert_array_equal(state.extras.live[pool], live)
    # The metric follows the pool: 4 + 2 live at the start, then step 2's events.
    history = {h["step"]: h for h in map(json.loads, (tmp_path / "logs" / "metrics.jsonl")
                                         .read_text().splitlines())}
    net = sum({"add": 1, "remove": -1}.get(e["kind"], 0) for e in events if e["step"] == 2)
    assert history[1]["train/num_experts"] == 6
    assert history[3]["train/num_experts"] == 6 + net
