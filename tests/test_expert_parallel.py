"""Sharded train steps on 8 CPU devices equal the single-device step, and split the work.

Batch rows are split over the ``data`` x ``expert`` mesh axes and expert banks over ``expert``
(``parallel``). For every family and the meshes (8, 1), (4, 2), (2, 4), one train step from the
same state and batch gives the single-device loss, metrics, parameters, optimizer state and
extras; each device receives B / 8 rows, and no device of a mesh with an expert axis does more
work (compiled flops per device) than a device of the pure data-parallel (8, 1) mesh. DynTRM's
dispatch modes (dense, scan, sparse) are checked the same way on the (2, 4) mesh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_FAMILY_CONFIGS

from tinyonn_jax import trainer
from tinyonn_jax.config import apply_overrides
from tinyonn_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MESHES = ((8, 1), (4, 2), (2, 4))
BATCH, LENGTH = 8, 16

# One process per test: 8 fake CPU devices. Both sides of every comparison are compiled with the
# same flags; LLVM optimisation level 0 only shortens the compiles.
SCRIPT = textwrap.dedent("""
    import dataclasses, os, sys, json
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                               "--xla_backend_optimization_level=0")
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from jax.sharding import NamedSharding, PartitionSpec as P
    from conftest import TINY_FAMILY_CONFIGS, tiny_batch
    from tinyonn_jax import parallel
    from tinyonn_jax.config import OptimizerConfig, apply_overrides
    from tinyonn_jax.families.registry import get_family
    assert len(jax.devices()) == 8
    TMP = {tmp!r}
    # Adam's first update is lr * sign(g): a gradient element that is zero up to rounding moves
    # its parameter by +-lr depending on the compiled program. SGD with momentum keeps the
    # update linear in the gradient, and its trace (the gradient) is compared as optimizer state.
    SGD = OptimizerConfig(name="sgd", learning_rate=0.1, kwargs=(("momentum", 0.9),))

    # The initial parameters are structured: at DynONN's orthogonal prototypes the gradient of its
    # diversity loss sqrt(||S^T S - I||^2 + 1e-12) is rounding noise / 1e-6, different for every
    # compiled program. A fixed jitter moves the state to a generic, well-conditioned point.
    def jitter(params):
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(7), len(leaves))
        return tree.unflatten([x + 0.01 * jax.random.normal(k, x.shape, x.dtype)
                               if jax.dtypes.issubdtype(x.dtype, np.floating) else x
                               for x, k in zip(leaves, keys)])

    def plain(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    def save(path, state, metrics):
        leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        arrays = {{jax.tree_util.keystr(k).replace("/", "|"): plain(x) for k, x in leaves}}
        arrays.update({{"m:" + k.replace("/", "|"): np.asarray(v) for k, v in metrics.items()}})
        np.savez(path, **arrays)

    out = {{}}
    for case, family_name, overrides, meshes in {cases!r}:
        cfg = apply_overrides(TINY_FAMILY_CONFIGS[family_name], overrides)
        cfg = dataclasses.replace(cfg, optim=SGD, meta_optim=SGD)
        family = get_family(cfg)
        opt = family.build_optimizer(cfg)
        state = family.init_state(cfg, opt, jax.random.key(0))
        state = state._replace(params=jitter(state.params))
        batch = {{k: np.asarray(v) for k, v in tiny_batch(cfg, {b}, {t}).items()}}

        def step(s, b):
            return family.train_step(s, b, cfg=cfg, optimizer=opt)

        single = jax.jit(step).lower(state, batch).compile()
        save(f"{{TMP}}/{{case}}_single.npz", *single(state, batch))
        rows = dict(single=dict(flops=single.cost_analysis()["flops"]))
        for data, expert in meshes:
            c = apply_overrides(cfg, [f"train.mesh_data={{data}}", f"train.mesh_expert={{expert}}"])
            mesh = parallel.make_mesh(c.train)
            shardings = parallel.state_shardings(mesh, state, family.expert_axes(c))
            bsh = parallel.batch_sharding(mesh)
            compiled = jax.jit(step, in_shardings=(shardings, bsh),
                               out_shardings=(shardings, NamedSharding(mesh, P()))
                               ).lower(state, batch).compile()
            new, metrics = compiled(jax.device_put(state, shardings),
                                    parallel.shard_batch(batch, mesh))
            save(f"{{TMP}}/{{case}}_{{data}}x{{expert}}.npz", new, metrics)
            batch_in = compiled.input_shardings[0][1]
            rows[f"{{data}}x{{expert}}"] = dict(
                flops=compiled.cost_analysis()["flops"],
                shard_rows=sorted({{s.shard_shape(batch[k].shape)[0]
                                    for k, s in batch_in.items()}}),
                device_rows=sorted({{x.data.shape[0] for v in parallel.shard_batch(batch, mesh)
                                     .values() for x in v.addressable_shards}}))
        out[case] = rows
    print("RESULT" + json.dumps(out))
""")


def _run(tmp_path: Path, cases) -> dict:
    script = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), tmp=str(tmp_path),
                           cases=cases, b=BATCH, t=LENGTH)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


# Metrics that count signs or argmins of values that are zero or tied up to rounding, so each
# compiled program's rounding decides them: DynTRM's shares of routed pairs whose goodness is
# > 0, < 0 or == 0 (the tiny model, one step: 7.8% exactly 0 on one device, none on the (8, 1)
# mesh, 8.6% on (4, 2)) and the gating accuracies (tokens judged where some cost or surprise is
# > 0, a hit when the argmax of the routing is the argmin of the cost; one token in about 1500
# differs). The values they count reach the parameters and optimizer state, which are compared.
ROUNDING_DECIDED = ("goodness_pos", "goodness_neg", "goodness_zero", "gating_acc")


def _compared(name: str) -> bool:
    return not (name.startswith("m:") and any(k in name for k in ROUNDING_DECIDED))


def _assert_same(tmp_path: Path, case: str, mesh: str) -> None:
    one = np.load(tmp_path / f"{case}_single.npz")
    many = np.load(tmp_path / f"{case}_{mesh}.npz")
    assert sorted(one.files) == sorted(many.files)
    for name in filter(_compared, one.files):
        np.testing.assert_allclose(many[name], one[name], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{case} on the {mesh} mesh: {name}")


def _assert_rows_split(rows: dict, case: str) -> None:
    """Every device holds B / 8 rows, and no mesh gives a device more work than (8, 1)."""
    flops = {k: v["flops"] for k, v in rows.items()}
    if "8x1" in flops:
        assert flops["8x1"] < 0.5 * flops["single"], (case, flops)
        for mesh, f in flops.items():
            assert mesh == "single" or f <= 1.01 * flops["8x1"], (case, mesh, flops)
    for mesh in (k for k in rows if k != "single"):
        assert rows[mesh]["shard_rows"] == [BATCH // 8], (case, mesh, rows[mesh])
        assert rows[mesh]["device_rows"] == [BATCH // 8], (case, mesh, rows[mesh])


@pytest.mark.parametrize("family", ["dyntrm", "spl", "dynonn"])
def test_sharded_step_equals_single_device_and_splits_rows(tmp_path, family):
    meshes = [f"{d}x{e}" for d, e in MESHES]
    res = _run(tmp_path, [(family, family, [], list(MESHES))])
    rows = res[family]
    assert set(rows) == {"single", *meshes}
    for mesh in meshes:
        _assert_same(tmp_path, family, mesh)
    _assert_rows_split(rows, family)


def test_dyntrm_dispatch_modes_sharded_equal_single_device(tmp_path):
    """dense, scan and sparse expert evaluation (both sites, qkv_routers) on the (2, 4) mesh,
    with room for every routed pair (capacity_frac=1: nothing is dropped)."""
    modes = ("dense", "scan", "sparse")
    cases = [(mode, "dyntrm", ["model.attn_layout=qkv_routers", f"model.attn_dispatch={mode}",
                               f"model.ffn_dispatch={mode}", "model.capacity_frac=1.0"], [(2, 4)])
             for mode in modes]
    res = _run(tmp_path, cases)
    for mode in modes:
        _assert_same(tmp_path, mode, "2x4")
        _assert_rows_split(res[mode], mode)


def test_global_batch_must_divide_over_data_and_expert_devices():
    cfg = apply_overrides(TINY_FAMILY_CONFIGS["dyntrm"], ["data.batch_size=4"])
    trainer.check_config(cfg, jax.sharding.AbstractMesh((2, 2), ("data", "expert")))
    with pytest.raises(ConfigError, match=r"data\.batch_size=4.*data x expert.*2 x 4"):
        trainer.check_config(cfg, jax.sharding.AbstractMesh((2, 4), ("data", "expert")))
