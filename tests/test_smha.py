"""DynONN (issue 7, seed 002): structure, bf16 inner/outer remat, 1f2b1o training, maintenance;
the NNX modules (parameter groups from types, declared expert axes, initialisation)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tinyonn_jax import loss as task_loss
from tinyonn_jax import parallel
from tinyonn_jax.config import Config, OptimizerConfig
from tinyonn_jax.families.dynonn import model as dynonn
from tinyonn_jax.families.dynonn import modules
from tinyonn_jax.families.dynonn import step as ms
from tinyonn_jax.families.dynonn.family import DYNONN
from tinyonn_jax.nn import gamoe, variables
from tinyonn_jax.nn.norm import init_layer_norm
from tinyonn_jax.nn.variables import MAIN, META

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
    p_rec = modules.init_params(jax.random.key(0), rec)
    p_stack = {**p_rec, "layers": jax.tree.map(
        lambda a: jnp.broadcast_to(a, (CFG.num_layers, *a.shape[1:])), p_rec["layers"])}
    inputs = _batch(CFG)["inputs"]
    fwd = jax.jit(dynonn.forward, static_argnums=2)
    a, aux_a = fwd(p_rec, inputs, rec)
    b, aux_b = fwd(p_stack, inputs, CFG)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert isinstance(aux_a, dynonn.Aux) and isinstance(aux_a.site("ffn"), dynonn.SiteAux)
    np.testing.assert_array_equal(aux_a.ffn.mask, aux_b.ffn.mask)
    assert aux_a.attn.z.shape == (CFG.num_layers, B, T, CFG.max_experts)
    assert aux_a.attn.u.shape == (CFG.num_layers, B, T, CFG.hidden)
    assert aux_a.ffn.k.shape == aux_a.ffn.homeless.shape == (CFG.num_layers, B, T)
    with pytest.raises(ValueError, match="unknown gated site"):
        aux_a.site("q")


def test_bf16_remat_cannot_flip_a_routing_decision():
    """Gradients with remat in bf16 equal gradients with the forward's decisions held fixed
    (no remat): the backward used exactly the forward's masks. Flipping one decision changes
    them, so the comparison is sensitive."""
    cfg = dataclasses.replace(CFG, compute_dtype="bfloat16", remat=True)
    batch = _batch(cfg)
    params = modules.init_params(jax.random.key(1), cfg)

    @functools.partial(jax.jit, static_argnames="remat")
    def grads(params, decisions, remat):
        c = dataclasses.replace(cfg, remat=remat)

        def f(p):
            logits, aux = dynonn.forward(p, batch["inputs"], c, decisions=decisions)
            return task_loss.cross_entropy(logits, batch["targets"], batch["weights"]), aux

        return jax.grad(f, has_aux=True)(params)

    g_remat, aux = grads(params, None, remat=True)
    dec = dynonn.decisions_of(aux)
    mask = np.asarray(dec.ffn.mask)
    assert 0 < mask.mean() < 1
    assert aux.ffn.u.dtype == jnp.bfloat16
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
    dec_f = dec._replace(ffn=dec.ffn._replace(mask=jnp.asarray(flipped)))
    g_flip, _ = grads(params, dec_f, remat=False)
    diff = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in zip(jax.tree.leaves(g_flip), jax.tree.leaves(g_fixed), strict=True))
    assert diff > 1e-4


ADAM = OptimizerConfig(name="adam", kwargs=(), learning_rate=1e-2)
FULL = Config(family="dynonn", model=CFG, optim=ADAM, meta_optim=ADAM)


@pytest.fixture(scope="module")
def trainer():
    opt = DYNONN.build_optimizer(FULL)
    return opt, DYNONN.make_train_step(FULL, opt)


def test_main_loss_falls_on_a_fixed_batch(trainer):
    opt, step = trainer
    state = DYNONN.init_state(FULL, opt, jax.random.key(0))
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
    assert int(state.extras.cursor) == 30


def _set_gates(state, site, group, experts, value):
    layers = state.params["layers"]
    gates = layers[site]["gates"].at[group, jnp.asarray(experts)].set(value)
    layers = {**layers, site: {**layers[site], "gates": gates}}
    return state._replace(params={**state.params, "layers": layers})


def test_maintain_adds_removes_and_regenerates(trainer):
    opt, step = trainer
    state = DYNONN.init_state(FULL, opt, jax.random.key(0))
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
    assert not bool(state.extras.live["ffn"][0, 1]) and bool(state.extras.live["attn"][1, 3])
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
    assert bool(state.extras.live["ffn"][1, 0])
    state, m = step(state, batch)
    assert np.isfinite(float(m["train/main_loss"]))


# The expert slot axis of every expert-stacked leaf of params['layers'][site] (axis 0 is G).
EXPERT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 1, "w1": 1, "w2": 1, "gates": 1, "proto_sim": 2}


def _path(path) -> str:
    return "/".join(str(k.key) for k in path)


class _Misnamed(nnx.Module):
    """Parameters whose names say the opposite of their types."""

    def __init__(self):
        self.router = variables.meta(jnp.zeros((3,)))
        self.gate_proj = variables.main(jnp.ones((3, 2)))
        self.sub = nnx.Dict(proto_scale=variables.main(jnp.ones((2,))),
                            bias=variables.meta(jnp.zeros((2,))))


def test_groups_come_from_types_not_names():
    assert variables.labels(_Misnamed()) == {
        "router": META, "gate_proj": MAIN, "sub": {"proto_scale": MAIN, "bias": META}}

    class Untyped(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((2,)))

    with pytest.raises(TypeError, match="no group"):
        variables.labels(Untyped())
    # DynONN: the gate leaves (and only they) are MetaParam, every other leaf a MainParam.
    labels = modules.param_labels(CFG)
    shapes = jax.eval_shape(lambda: modules.init_params(jax.random.key(0), CFG))
    assert jax.tree.structure(labels) == jax.tree.structure(shapes)
    meta = {_path(p) for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0] if lab == META}
    gate = ("proto_sim", "gates", "gate_log_scale")
    assert meta == {f"layers/{s}/{n}" for s in dynonn.SITES for n in gate}
    state = nnx.state(modules.abstract_model(CFG), nnx.Param)
    for path, var in nnx.to_flat_state(state):
        want = variables.MetaParam if path[-1] in gate else variables.MainParam
        assert type(var) is want, path


@pytest.mark.parametrize("structure", ["stack", "recursion"])
def test_expert_axes_mark_exactly_the_expert_stacked_leaves(structure):
    """Declared axes: the expert slot of every expert-stacked leaf, -1 elsewhere; over an
    8-way expert mesh axis each of those leaves splits into equal shards of one expert."""
    cfg = dataclasses.replace(CFG, structure=structure, max_experts=8)
    axes = modules.expert_axes(cfg)
    shapes = jax.eval_shape(lambda: modules.init_params(jax.random.key(0), cfg))
    assert jax.tree.structure(axes) == jax.tree.structure(shapes)
    assert variables.EXPERT == parallel.EXPERT
    mesh = AbstractMesh((1, 8), (parallel.DATA, parallel.EXPERT))
    stacked = 0
    for (path, ax), leaf in zip(jax.tree_util.tree_flatten_with_path(axes)[0],
                                jax.tree.leaves(shapes), strict=True):
        keys = _path(path).split("/")
        want = EXPERT_AXES.get(keys[-1], -1) if keys[0] == "layers" else -1
        assert ax == want, keys
        if ax < 0:
            continue
        stacked += 1
        shape = leaf.shape
        assert shape[0] == cfg.groups and shape[ax] == cfg.max_experts, (keys, shape)
        spec = P(*(parallel.EXPERT if i == ax else None for i in range(len(shape))))
        shard = NamedSharding(mesh, spec).shard_shape(shape)  # raises unless even
        assert shard == (*shape[:ax], 1, *shape[ax + 1:]), (keys, shard)
    assert stacked == 2 * 2 + 6  # proto_sim and gates per site, six banks


def _reference_layer(key: jax.Array, cfg) -> dict:
    """One layer by the functional initialisation the modules reproduce bit for bit."""
    k_w, k_p = jax.random.split(key)
    e, d, hw, f = cfg.max_experts, cfg.hidden, cfg.attn_width, cfg.ffn_hidden
    shapes = {"wq": ((e, d, hw), d), "wk": ((e, d, hw), d), "wv": ((e, d, hw), d),
              "wo": ((e, hw, d), hw), "w1": ((e, d, f), d), "w2": ((e, f, d), f)}
    sizes = [int(np.prod(sh)) for sh, _ in shapes.values()]
    flat = jax.random.normal(k_w, (sum(sizes),), jnp.float32)
    banks = {n: part.reshape(sh) / np.sqrt(fan_in) for (n, (sh, fan_in)), part
             in zip(shapes.items(), jnp.split(flat, np.cumsum(sizes)[:-1]), strict=True)}
    a = jax.random.normal(k_p, (2, max(d, e), min(d, e)), jnp.float32)
    q, r = jnp.linalg.qr(a)
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    protos = q if d >= e else jnp.swapaxes(q, -1, -2)
    attn = {**gamoe.gate_params(protos[0], cfg.gate_init_t),
            **{n: banks[n] for n in ("wq", "wk", "wv", "wo")}}
    ffn = {**gamoe.gate_params(protos[1], cfg.gate_init_t), "w1": banks["w1"], "w2": banks["w2"]}
    return {"ln1": init_layer_norm(d), "attn": attn, "ln2": init_layer_norm(d), "ffn": ffn}


def _reference_layers(key: jax.Array, cfg) -> dict:
    return jax.vmap(lambda k: _reference_layer(k, cfg))(jax.random.split(key, cfg.groups))


def _assert_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                            strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), _path(path)


@pytest.mark.parametrize("structure", ["stack", "recursion"])
def test_module_init_is_the_functional_init_bit_for_bit(structure):
    cfg = dataclasses.replace(CFG, structure=structure)
    k_emb, k_layers, k_head = jax.random.split(jax.random.key(3), 3)
    want = {"embed": cfg.init_std * jax.random.normal(k_emb, (cfg.vocab_size, cfg.hidden)),
            "layers": _reference_layers(k_layers, cfg),
            "final_ln": init_layer_norm(cfg.hidden),
            "lm_head": jax.random.normal(k_head, (cfg.hidden, cfg.vocab_size), jnp.float32)
            / np.sqrt(cfg.hidden)}
    _assert_identical(modules.init_params(jax.random.key(3), cfg), want)
    # The source of regenerated experts, traced as in the jitted lifecycle update.
    fresh = jax.jit(modules.init_layers, static_argnums=1)(jax.random.key(5), cfg)
    _assert_identical(fresh, jax.jit(_reference_layers, static_argnums=1)(jax.random.key(5), cfg))


def test_model_call_is_the_evaluation_forward():
    model = modules.DynOnnModel(CFG, jax.random.key(2))
    assert model.cfg is CFG
    params = variables.pure_params(model)
    pool = ms.lifecycle.init_pool(CFG, jax.random.key(0))
    pool = pool._replace(live={**pool.live, "ffn": pool.live["ffn"].at[0, 0].set(False)})
    inputs = _batch(CFG)["inputs"]
    got = model(inputs, live=pool.live)
    assert got.shape == (B, T, CFG.vocab_size) and got.dtype == jnp.float32
    np.testing.assert_array_equal(got, ms.eval_logits(params, pool, inputs, CFG))
    np.testing.assert_array_equal(
        model(inputs), dynonn.forward(params, inputs, CFG, training=False)[0])
