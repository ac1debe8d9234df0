"""Collectives of the compiled train step on 8 CPU devices, per family, mesh and dispatch.

Batch rows are split over the ``data`` x ``expert`` mesh axes, expert banks over ``expert``
(``tinyonn_jax.parallel``). For the tiny config of each family (``configs/tiny*.py``) and the
default DynTRM size in the qkv_routers layout (``common.with_layout``), on the (data, expert)
meshes (8, 1), (4, 2), (2, 4), and for DynTRM with dense and sparse expert dispatch (FFN experts,
and the attention library in the qkv_routers layout), the step is compiled (nothing runs) and
its optimized HLO is read: per collective (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute) the number of ops and the bytes of their per-device results. Ops inside a
loop body (the refinement-step scan) count once, not once per iteration. Also printed: the
compiled flops per device (XLA's cost analysis) relative to the same step on one device.
One JSON line per case, then a table.
Usage: python bench/collectives.py [--smoke] [--batch 8] [--seq-len 512]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import emit, random_batch, with_layout  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from tinyonn_jax import parallel, trainer  # noqa: E402
from tinyonn_jax.config import Config, apply_overrides  # noqa: E402
from tinyonn_jax.families.registry import get_family  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
MESHES = ((8, 1), (4, 2), (2, 4))
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(KINDS) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(BYTES) + r")\[([\d,]*)\]")


def collectives(hlo: str) -> dict:
    """{kind: (ops, bytes of their results per device)} of an optimized HLO module's text."""
    out = {k: [0, 0] for k in KINDS}
    for line in hlo.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        size = sum(BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                   for t, dims in _SHAPE.findall(m.group(1)))
        out[m.group(2)][0] += 1
        out[m.group(2)][1] += size
    return {k: tuple(v) for k, v in out.items()}


def with_dispatch(cfg: Config, dispatch: str) -> Config:
    """DynTRM's FFN experts (and a qkv_routers attention library) evaluated by ``dispatch``."""
    attn = dispatch if cfg.model.attn_layout == "qkv_routers" else cfg.model.attn_dispatch
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, ffn_dispatch=dispatch, attn_dispatch=attn))


def compile_step(cfg: Config, batch: dict, mesh=None):
    """The family's train step compiled from shapes (no state is built), on ``mesh`` or one
    device."""
    family = get_family(cfg)
    opt = family.build_optimizer(cfg)
    shapes = jax.eval_shape(lambda k: family.init_state(cfg, opt, k), jax.random.key(0))

    def step(s, b):
        return family.train_step(s, b, cfg=cfg, optimizer=opt)

    if mesh is None:
        return jax.jit(step).lower(shapes, batch).compile()
    shardings = parallel.state_shardings(mesh, shapes, family.expert_axes(cfg))
    fn = jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                 out_shardings=(shardings, NamedSharding(mesh, P())))
    return fn.lower(shapes, batch).compile()


def cases(smoke: bool):
    """(name, config, dispatches) of every model measured."""
    out = [("tiny dyntrm", trainer.load_config(CONFIGS / "tiny.py"), ("dense", "sparse")),
           ("tiny spl", trainer.load_config(CONFIGS / "tiny_spl.py"), (None,)),
           ("tiny dynonn", trainer.load_config(CONFIGS / "tiny_dynonn.py"), (None,))]
    if not smoke:
        out.append(("default dyntrm qkv_routers", with_layout(Config(), "qkv_routers"),
                    ("dense", "sparse")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny configs only")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    assert len(jax.devices()) == 8, "needs 8 devices (XLA_FLAGS was set before JAX started)"
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         random_batch(args.batch, args.seq_len))
    rows = []
    for name, base, dispatches in cases(args.smoke):
        for dispatch in dispatches:
            cfg = base if dispatch is None else with_dispatch(base, dispatch)
            flops_one = compile_step(cfg, batch).cost_analysis()["flops"]
            for data, expert in MESHES:
                c = apply_overrides(cfg, [f"train.mesh_data={data}",
                                          f"train.mesh_expert={expert}"])
                compiled = compile_step(c, batch, parallel.make_mesh(c.train))
                found = collectives(compiled.as_text())
                row = dict(model=name, dispatch=dispatch or "-", mesh=f"{data}x{expert}",
                           flops_per_device=compiled.cost_analysis()["flops"] / flops_one,
                           **{k: n for k, (n, _) in found.items()},
                           **{f"{k}_MiB": b / 2**20 for k, (_, b) in found.items()})
                emit(row)
                rows.append(row)
    head = f"{'model':28} {'dispatch':8} {'mesh':5} {'flops/dev':>9} " + " ".join(
        f"{k:>22}" for k in KINDS)
    print("\ncollectives per compiled train step: ops (MiB of per-device results)")
    print(head)
    for r in rows:
        cells = " ".join(f"{r[k]:>9d} ({r[k + '_MiB']:9.3f})" for k in KINDS)
        print(f"{r['model']:28} {r['dispatch']:8} {r['mesh']:5} "
              f"{r['flops_per_device']:9.3f} {cells}")


if __name__ == "__main__":
    main()
