"""One skeleton for every family: groups from parameter types, declared expert axes, one update."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_FAMILY_CONFIGS, tiny_batch, tiny_model_config

from tinyonn_jax import train_state
from tinyonn_jax.config import Config, OptimizerConfig
from tinyonn_jax.families.dyntrm import modules as dyntrm_modules
from tinyonn_jax.families.registry import FAMILIES, get_family
from tinyonn_jax.family import FamilyBase
from tinyonn_jax.nn import variables
from tinyonn_jax.nn.variables import MAIN, META

ROOT = Path(__file__).resolve().parents[1]

def _name_rule(path) -> str:
    """The groups the families had by leaf name: routing leaves are proto*/gate*, and SPL's
    prototype pathway (prc*)."""
    name = str(path[-1].key)
    return META if name.startswith(("proto", "gate", "prc")) else MAIN


@pytest.mark.parametrize("name", sorted(TINY_FAMILY_CONFIGS))
def test_every_family_is_registered_and_its_types_give_the_known_groups(name):
    cfg = TINY_FAMILY_CONFIGS[name]
    family = get_family(cfg)
    assert family is FAMILIES[name] and family.name == name
    labels = family.param_labels(cfg)
    params = jax.eval_shape(lambda k: family.init_params(k, cfg), jax.random.key(0))
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    assert {lab for _, lab in flat} == {MAIN, META}
    for path, lab in flat:
        assert lab == _name_rule(path), jax.tree_util.keystr(path)


def test_renaming_a_leaf_does_not_move_it_between_groups():
    model = dyntrm_modules.DynTRM(tiny_model_config(attn_layout="qkv_routers"),
                                  jax.random.key(0))
    attn = model.block.attn
    # A routing tensor under a computation-sounding name, a computation one under "gate...".
    attn.library_mix = attn.proto_q
    del attn.proto_q
    attn.gate_like = variables.main(jnp.ones((3,)))
    labels = variables.labels(model)["block"]["attn"]
    assert labels["library_mix"] == META and labels["gate_like"] == MAIN
    assert "proto_q" not in labels and labels["proto_k"] == META
    # The optimizer built from these labels moves only the meta leaf with the meta chain.
    params = variables.pure_params(model)
    cfg = Config(optim=OptimizerConfig(name="sgd", learning_rate=1.0, kwargs=()),
                 meta_optim=OptimizerConfig(name="sgd", learning_rate=1e-3, kwargs=()))
    opt = train_state.optim.build_optimizer(cfg, variables.labels(model))
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(ones, opt.init(params), params)
    np.testing.assert_allclose(updates["block"]["attn"]["library_mix"], -1e-3)
    np.testing.assert_allclose(updates["block"]["attn"]["gate_like"], -1.0)


def test_a_parameter_without_a_group_is_an_error():
    model = dyntrm_modules.DynTRM(tiny_model_config(), jax.random.key(0))
    from flax import nnx
    model.block.stray = nnx.Param(jnp.zeros((2,)))
    with pytest.raises(TypeError, match="no group"):
        variables.labels(model)


@pytest.mark.parametrize("name", sorted(TINY_FAMILY_CONFIGS))
def test_expert_axes_are_declared_on_expert_stacked_leaves(name):
    cfg = TINY_FAMILY_CONFIGS[name]
    family = get_family(cfg)
    axes = family.expert_axes(cfg)
    params = jax.eval_shape(lambda k: family.init_params(k, cfg), jax.random.key(0))
    declared = [(p, a) for p, a in jax.tree_util.tree_flatten_with_path(axes)[0] if a >= 0]
    assert declared, "every family has expert-stacked parameters"
    shapes = {jax.tree_util.keystr(p): s.shape
              for p, s in jax.tree_util.tree_flatten_with_path(params)[0]}
    m = cfg.model
    pools = ({m.num_attn_experts, m.num_ffn_experts} if name == "dyntrm"
             else {m.max_experts} if name == "dynonn"
             else {m.dims(k)[1] for k in m.kinds})  # SPL: one expert per output neuron
    for path, axis in declared:
        assert shapes[jax.tree_util.keystr(path)][axis] in pools, jax.tree_util.keystr(path)


def test_every_family_goes_through_the_same_update(monkeypatch):
    for role in ("build_optimizer", "init_state", "train_step", "make_train_step"):
        for family in FAMILIES.values():
            assert getattr(type(family), role) is getattr(FamilyBase, role), (family, role)
    calls = []
    real = train_state.apply_update

    def spy(state, out, optimizer, ema_decay):
        calls.append(type(state.extras).__name__)
        return real(state, out, optimizer, ema_decay)

    monkeypatch.setattr(train_state, "apply_update", spy)
    for name, cfg in TINY_FAMILY_CONFIGS.items():
        family = get_family(cfg)
        opt = family.build_optimizer(cfg)
        state = family.init_state(cfg, opt, jax.random.key(0))
        new, metrics = family.train_step(state, tiny_batch(cfg), cfg=cfg, optimizer=opt)
        assert isinstance(new, train_state.TrainState) and int(new.step) == 1, name
        for key in ("train/main_loss", "train/token_acc", "train/exact_acc", "train/tau",
                    "train/skipped", "train/update_ok", "optim/lr/main", "optim/lr/meta"):
            assert key in metrics and np.isfinite(float(metrics[key])), (name, key)
    assert len(calls) == len(TINY_FAMILY_CONFIGS)


def test_keep_if_keeps_typed_keys_and_arrays():
    new = {"k": jax.random.key(1), "x": jnp.ones(2)}
    old = {"k": jax.random.key(2), "x": jnp.zeros(2)}
    for ok, want in ((True, new), (False, old)):
        got = train_state.keep_if(jnp.bool_(ok), new, old)
        np.testing.assert_array_equal(jax.random.key_data(got["k"]),
                                      jax.random.key_data(want["k"]))
        np.testing.assert_array_equal(got["x"], want["x"])


SHARDED = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from conftest import TINY_FAMILY_CONFIGS
    from tinyonn_jax import parallel, trainer
    from tinyonn_jax.config import apply_overrides
    from tinyonn_jax.families.registry import get_family
    assert len(jax.devices()) == 8
    out = {{}}
    for name, cfg in TINY_FAMILY_CONFIGS.items():
        cfg = apply_overrides(cfg, ["train.mesh_expert=2"])
        family = get_family(cfg)
        mesh = parallel.make_mesh(cfg.train)
        opt = family.build_optimizer(cfg)
        key = jax.random.key(0)
        _, shardings = trainer._state_template(family, cfg, opt, mesh, key)
        state = jax.jit(lambda k: family.init_state(cfg, opt, k), out_shardings=shardings)(key)
        rows = []
        for part in ("params", "opt_state"):
            leaves = jax.tree_util.tree_flatten_with_path(getattr(state, part))[0]
            for path, x in leaves:
                shard = x.addressable_shards[0].data.shape
                rows.append([part, jax.tree_util.keystr(path), list(x.shape), list(shard),
                             [a for a in x.sharding.spec]])
        out[name] = dict(rows=rows, axes=jax.tree_util.tree_map_with_path(
            lambda p, a: [jax.tree_util.keystr(p), int(a)], family.expert_axes(cfg)))
    print("RESULT" + json.dumps(out))
""")


def test_every_familys_expert_leaves_are_split_on_the_expert_mesh_axis(tmp_path):
    """8 CPU devices as a 4 (data) x 2 (expert) mesh: every declared expert axis is split in
    two, in the parameters and in the optimizer state that follows them; nothing else is."""
    script = SHARDED.format(root=str(ROOT), tests=str(ROOT / "tests"))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert set(res) == set(TINY_FAMILY_CONFIGS)
    for name, r in res.items():
        axes = dict(jax.tree.leaves(r["axes"], is_leaf=lambda x: isinstance(x, list)
                                    and len(x) == 2 and isinstance(x[0], str)))
        split = 0
        for part, path, shape, shard, spec in r["rows"]:
            match = [p for p in axes if path.endswith(p)] if part == "opt_state" else [path]
            axis = axes[max(match, key=len)] if match and len(shape) else -1
            if axis >= 0 and len(shape) > axis:
                want = list(shape)
                want[axis] //= 2
                assert shard == want and spec[axis] == "expert", (name, part, path, spec)
                split += 1
            else:
                assert shard == shape, (name, part, path, spec)
        n_declared = sum(a >= 0 for a in axes.values())
        assert split >= 2 * n_declared, (name, split, n_declared)  # params + Adam moments


def test_readme_library_snippet_runs():
    """The README's library example, on the brute-force test size instead of the default."""
    text = (ROOT / "README.md").read_text()
    code = text.split("### As a library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "cfg = Config()" in code
    code = code.replace("cfg = Config()", "cfg = Config(model=tiny_model_config())")
    cfg = Config(model=tiny_model_config())
    batch = tiny_batch(cfg)
    scope = {"tokens": batch["inputs"], "batch": batch, "tiny_model_config": tiny_model_config}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 -- the README's own example
    assert scope["logits"].shape == (*batch["inputs"].shape, cfg.model.vocab_size)
    assert int(scope["train_state"].step) == 1 and np.isfinite(
        float(scope["metrics"]["train/main_loss"]))
    assert set(jax.tree.leaves(variables.labels(scope["model"]))) == {MAIN, META}
