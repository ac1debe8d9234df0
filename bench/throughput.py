"""Training throughput (tokens/s) and the fraction of this machine's matmul peak it reaches.

The peak is measured in the same run: the best of several large float32 matmuls (2048^3) under
``jax.jit``. Model FLOPs: XLA's cost analysis of the forward pass of ONE refinement step with
the batched dense expert evaluation (the analysis counts a loop body once, whatever its trip
count), times the number of steps, times 3 for forward + backward. SARS statistics are not
counted, so the fraction is conservative.
One JSON line per config (tiny; tiny and the default size with qkv_routers, ``common.with_layout``):
  {"config": ..., "tokens_per_s": ..., "model_gflops_per_s": ..., "peak_gflops_per_s": ...,
   "fraction_of_peak": ...}
Usage: python bench/throughput.py [--seq-len 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from common import compiled_step, emit, random_batch, time_fn, with_layout

from tinyonn_jax.config import Config
from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.trainer import load_config


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """Best observed float32 matmul rate in FLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    best = min(time_fn(f, a, b, reps=1) for _ in range(reps))
    return 2.0 * n**3 / best


def forward_flops_one_step(cfg: Config, batch: dict) -> float:
    """XLA's FLOP count of the forward with a single refinement step (no loop to miscount)."""
    # Batched dense evaluation for the count: the same sums as any dense dispatch, and no inner
    # loop (the analysis would count a scan over experts once, not once per expert).
    one = dataclasses.replace(cfg.model, max_refinement_steps=1, attn_dispatch="dense",
                              ffn_dispatch="dense")
    params = modules.init_params(jax.random.key(0), one)
    fwd = jax.jit(lambda p, t: tr.forward(p, t, one)[0]).lower(params, batch["inputs"])
    return float(fwd.compile().cost_analysis().get("flops", 0.0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    peak = matmul_peak()
    tiny = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    batch = random_batch(1, a.seq_len)
    for name, cfg in (("tiny", tiny), ("tiny_qkv_routers", with_layout(tiny, "qkv_routers")),
                      ("default_qkv_routers", with_layout(Config(), "qkv_routers"))):
        fn, state, compiled, _ = compiled_step(cfg, batch)
        flops = 3 * cfg.model.max_refinement_steps * forward_flops_one_step(cfg, batch)
        step_s = time_fn(lambda s, f=compiled: f(s, batch)[1]["train/loss"], state, reps=a.reps)
        emit({"config": name, "seq_len": a.seq_len, "step_s": step_s,
              "tokens_per_s": a.seq_len / step_s, "model_gflops_per_s": flops / step_s / 1e9,
              "peak_gflops_per_s": peak / 1e9, "fraction_of_peak": flops / step_s / peak})


if __name__ == "__main__":
    main()
