"""Sparse vs dense expert dispatch: full train-step time of the default config's FFN experts
(16 x 512->2048->512) at activation rates 1/2, 1/8, 1/32, measured side by side in one run.

The FFN gates are set per expert to the (1 - rate) quantile of its routing scores on the batch
(over all refinement steps),
so each expert is active for about ``rate`` of the tokens; sparse capacity = 1.5 * rate of the
tokens. Attention stays dense (its routing is untouched). One JSON line per rate:
  {"active_frac": r, "dense_s": ..., "sparse_s": ..., "speedup": dense/sparse, "overflow": ...}
A second line per rate isolates the FFN experts' share of a SARS train step: forward, backward
and the per-token, per-expert SARS statistics (C, O, goodness) of the bank of 16 experts, at the
same 512 -> 2048 -> 512 shapes and 2048 tokens. There the gates make every expert take exactly
``rate`` of the tokens, the capacity fits, nothing overflows, and the ratio is the pure cost of
dense vs grouped dispatch:
  {"layer": "ffn_experts", "active_frac": r, "dense_s": ..., "sparse_s": ..., "speedup": ...}
Usage: python bench/dispatch.py [--seq-len 512] [--reps 2] [--layer-only]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from common import compiled_step, emit, random_batch, time_fn

from tinyonn_jax.config import Config, ModelConfig
from tinyonn_jax.model import experts, routing
from tinyonn_jax.model import transformer as tr
from tinyonn_jax.sars import surprise


def gates_for_rate(cfg: Config, params: dict, batch: dict, rate: float) -> jax.Array:
    """Per-expert gate = the (1 - rate) quantile of that expert's scores over all steps.

    The FFN inputs of later steps depend on the gates, so this is iterated a few times.
    """
    ffn = params["block"]["ffn"]
    gate = ffn["gate"]
    for _ in range(3):
        p = jax.tree.map(lambda x: x, params)
        p["block"]["ffn"]["gate"] = gate
        _, aux = tr.forward(p, batch["inputs"], cfg.model)
        scores = routing.prototype_scores(aux["u_ffn"], ffn["proto"], jnp.zeros_like(gate))
        gate = jnp.quantile(scores.reshape(-1, scores.shape[-1]), 1.0 - rate, axis=0)
    return gate


def ffn_layer(rate: float, tokens: int, reps: int) -> dict:
    """Forward, backward and SARS statistics of the FFN expert bank alone, dense vs sparse."""
    cfg = ModelConfig()
    bank = experts.init_bank(jax.random.key(0), cfg.num_ffn_experts, cfg.hidden, cfg.ffn_hidden,
                             cfg.hidden)
    u = jax.random.normal(jax.random.key(1), (tokens, cfg.hidden))
    proto = jax.random.normal(jax.random.key(2), (cfg.num_ffn_experts, cfg.hidden))
    scores = routing.prototype_scores(u, proto, jnp.zeros((cfg.num_ffn_experts,)))
    k = max(1, round(rate * tokens))
    kth = jnp.sort(scores, axis=0)[tokens - k]  # every expert: exactly k tokens at or above
    z = jax.nn.relu(scores - kth + 1e-6)
    out = {"layer": "ffn_experts", "active_frac": rate, "tokens": tokens}
    frac = k / tokens
    for mode in ("dense", "sparse"):
        def step(b, x, m=mode):  # L = sum(A^2): g = dL/dA = 2A
            a, vjp = jax.vjp(lambda b, x: experts.apply(b, x, z, m, frac), b, x)
            g = 2.0 * a
            grads = vjp(g)
            if m == "sparse":
                st = surprise.token_stats_sparse(b, x, z, g, frac, "attribution")
            else:
                st = surprise.token_stats(b, x, (z,), (g,), "attribution")[0]
            return grads, st.goodness

        fn = jax.jit(step)
        out[f"{mode}_s"] = time_fn(fn, bank, u, reps=reps)
    out["speedup"] = out["dense_s"] / out["sparse_s"]
    out["overflow"] = int(experts.overflow_count(z > 0, k))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--layer-only", action="store_true")
    a = p.parse_args()
    for rate in (1 / 2, 1 / 8, 1 / 32):
        emit(ffn_layer(rate, 2048, a.reps))
    if a.layer_only:
        return
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
