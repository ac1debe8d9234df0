"""Sparse vs dense expert dispatch: full train-step time of the default config's FFN experts
(16 x 512->2048->512) at activation rates 1/2, 1/8, 1/32, measured side by side in one run.

The FFN gates are set per expert to the (1 - rate) quantile of its routing scores on the batch,
so each expert is active for about ``rate`` of the tokens; sparse capacity = 1.5 * rate of the
tokens. Attention stays dense (its routing is untouched). One JSON line per rate:
  {"active_frac": r, "dense_s": ..., "sparse_s": ..., "speedup": dense/sparse, "overflow": ...}
Usage: python bench/dispatch.py [--seq-len 512] [--reps 2]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from common import compiled_step, emit, random_batch, time_fn

from tinyonn_jax.config import Config, ModelConfig
from tinyonn_jax.model import routing
from tinyonn_jax.model import transformer as tr


def gates_for_rate(cfg: Config, params: dict, batch: dict, rate: float) -> jax.Array:
    """Per-expert gate = the (1 - rate) quantile of that expert's scores at the first step."""
    _, aux = tr.forward(params, batch["inputs"], cfg.model)
    ffn = params["block"]["ffn"]
    scores = routing.prototype_scores(aux["u_ffn"][0], ffn["proto"], jnp.zeros_like(ffn["gate"]))
    return jnp.quantile(scores.reshape(-1, scores.shape[-1]), 1.0 - rate, axis=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    batch = random_batch(1, a.seq_len)
    base = Config(model=ModelConfig(max_len=max(4096, a.seq_len)))
    for rate in (1 / 2, 1 / 8, 1 / 32):
        out = {"active_frac": rate, "seq_len": a.seq_len}
        for mode in ("dense", "sparse"):
            model = dataclasses.replace(base.model, ffn_dispatch=mode,
                                        capacity_frac=min(1.0, 1.5 * rate))
            cfg = dataclasses.replace(base, model=model)
            fn, state, _, _ = compiled_step(cfg, batch)
            gate = gates_for_rate(cfg, state.params, batch, rate)
            params = jax.tree.map(lambda x: x, state.params)
            params["block"]["ffn"]["gate"] = gate
            state = state._replace(params=params)
            out[f"{mode}_s"] = time_fn(lambda s, f=fn: f(s, batch)[1]["train/loss"], state,
                                       reps=a.reps)
            if mode == "sparse":
                _, aux = tr.forward(params, batch["inputs"], cfg.model)
                out["measured_active_frac"] = float(jnp.mean(aux["z_ffn"] > 0))
                out["overflow"] = int(jnp.sum(aux["overflow_ffn"]))
        out["speedup"] = out["dense_s"] / out["sparse_s"]
        emit(out)


if __name__ == "__main__":
    main()
