"""Compiled memory of the DynTRM train step per config, expert dispatch, remat and compute dtype.

For every case the jitted train step (state donated, as the trainer runs it) is lowered on
abstract inputs and compiled for this machine's backend; ``compiled.memory_analysis()`` gives
the bytes of the arguments (train state + batch), the outputs, the outputs aliased to donated
arguments, the temporaries and the generated code. ``total`` = arguments + outputs - aliased +
temporaries + code: the device memory the step needs while it runs. No step is executed.

Configs: ``default`` (the default ``Config()`` model at B1 T1024), ``tiny`` (configs/tiny.py at
its data shape), ``arc_agi1`` / ``arc_agi2`` (configs/arc_agi*.py at T = their max_len). The
batch is the PER-DEVICE batch: under the trainer's data-parallel mesh a device holds
``data.batch_size / devices`` rows and the replicated train state, so one device's memory is
this single-device compile at that batch (plus the gradient all-reduce buffers). ``--batch``
sets it (default: 1 row for the arc configs, i.e. their global batch 8 over 8 devices).

Dispatch ``dense`` | ``scan`` | ``sparse`` sets the FFN experts' dispatch and, with the
``qkv_routers`` layout, the attention library's (the latent-head layout is always dense).
Remat ``none`` | ``full`` | ``save_dots``; dtype ``float32`` | ``bfloat16`` (the compute dtype:
parameters and routing stay float32).

Compiled for the CPU the numbers are an estimate of an accelerator's: XLA:CPU computes
bfloat16 elementwise work in float32 (its float-normalisation pass), so the CPU's bf16
temporaries are larger than a GPU's or TPU's; XLA:GPU fuses more and usually needs fewer
temporaries; XLA:TPU pads the two minor dimensions of every buffer to (8, 128) tiles (16 rows for
bf16), which inflates small trailing axes (P experts, Dh = 64). Compile on the target
(bench/accelerator.py reports the device's own peak) for exact numbers.

Output: one JSON line per case (``common.emit``), then a Markdown table (GiB).
Usage: python bench/memory.py [--configs default,tiny,arc_agi1,arc_agi2] [--dispatch dense,...]
    [--remat none,full,save_dots] [--dtype float32,bfloat16] [--batch B] [--seq-len T]
    [--time-limit 600] [--smoke]
``--smoke``: tiny only, dense, remat none/full, both dtypes (about a minute on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from common import emit

from tinyonn_jax.config import Config
from tinyonn_jax.families.registry import get_family

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
FIELDS = ("argument", "output", "alias", "temp", "code")


def shipped_config(name: str) -> Config:
    """``default`` (Config()) or configs/<name>.py's ``get_config()``."""
    if name == "default":
        return Config()
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def default_shape(name: str, cfg: Config) -> tuple[int, int]:
    """(per-device batch, sequence length) measured for a config when not overridden."""
    if name == "default":
        return 1, 1024
    if name.startswith("arc_agi"):
        return 1, cfg.data.max_len
    return cfg.data.batch_size, cfg.data.max_len


def case_config(cfg: Config, dispatch: str, remat: str, dtype: str) -> Config:
    m = cfg.model
    attn = dispatch if m.attn_layout == "qkv_routers" else "dense"
    model = dataclasses.replace(m, ffn_dispatch=dispatch, attn_dispatch=attn, remat=remat,
                                compute_dtype=dtype)
    return dataclasses.replace(cfg, model=model)


def abstract_batch(batch: int, length: int) -> dict:
    i32 = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return {"inputs": i32, "targets": i32, "segment_ids": i32, "positions": i32,
            "weights": jax.ShapeDtypeStruct((batch, length), jnp.float32)}


def compiled_memory(cfg: Config, batch: int, length: int) -> tuple[dict, float]:
    """({field: bytes, total}, compile seconds) of the train step of ``cfg`` at (batch, length).

    The train state is abstract (``jax.eval_shape``): nothing is allocated or run."""
    family = get_family(cfg)
    opt = family.build_optimizer(cfg)
    state = jax.eval_shape(lambda: family.init_state(cfg, opt, jax.random.key(0)))
    step = family.make_train_step(cfg, opt, donate=True)
    t = time.perf_counter()
    mem = step.lower(state, abstract_batch(batch, length)).compile().memory_analysis()
    seconds = time.perf_counter() - t
    out = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
           "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
           "code": mem.generated_code_size_in_bytes}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["code"]
    return out, seconds


def table(rows: list[dict]) -> str:
    head = ("| config | B x T | dispatch | remat | dtype | argument | output | alias | temp | "
            "code | total | compile s |")
    lines = [head, "|" + " --- |" * 12]
    for r in rows:
        gib = [f"{r[k] / GIB:.3f}" for k in FIELDS + ("total",)]
        lines.append(f"| {r['config']} | {r['batch']} x {r['seq_len']} | {r['dispatch']} | "
                     f"{r['remat']} | {r['dtype']} | " + " | ".join(gib)
                     + f" | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="default,tiny,arc_agi1,arc_agi2")
    p.add_argument("--dispatch", default="dense,scan,sparse")
    p.add_argument("--remat", default="none,full,save_dots")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=0, help="per-device batch; 0 = per config")
    p.add_argument("--seq-len", type=int, default=0, help="0 = per config")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="skip the remaining cases once this many seconds are spent (0 = none)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    if a.smoke:
        a.configs, a.dispatch, a.remat = "tiny", "dense", "none,full"
    start, rows, skipped = time.perf_counter(), [], 0
    print(f"# backend {jax.default_backend()} ({jax.devices()[0].device_kind}); "
          "per-device batch; bytes from compiled.memory_analysis()", flush=True)
    for name in a.configs.split(","):
        base = shipped_config(name)
        b, t = default_shape(name, base)
        b, t = a.batch or b, a.seq_len or t
        for dispatch in a.dispatch.split(","):
            for remat in a.remat.split(","):
                for dtype in a.dtype.split(","):
                    if a.time_limit and time.perf_counter() - start > a.time_limit:
                        skipped += 1
                        continue
                    mem, seconds = compiled_memory(case_config(base, dispatch, remat, dtype),
                                                   b, t)
                    row = dict(config=name, batch=b, seq_len=t, dispatch=dispatch, remat=remat,
                               dtype=dtype, **mem, compile_s=seconds,
                               backend=jax.default_backend())
                    emit(row)
                    rows.append(row)
    print(table(rows))
    if skipped:
        print(f"# {skipped} cases skipped: --time-limit {a.time_limit:.0f} s spent")


if __name__ == "__main__":
    main()
