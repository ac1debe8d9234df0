"""Sparse vs dense expert dispatch of the default config at activation rates 1/2, 1/8, 1/32,
measured side by side in one run.

First, per rate, the FFN experts' share of a SARS train step in isolation: forward, backward and
the per-token, per-expert SARS statistics (C, O, goodness) of the bank of 16 experts
(512 -> 2048 -> 512), 2048 tokens. The gates make every expert take exactly ``rate`` of the
tokens, the capacity fits, nothing overflows, and the ratio is the pure cost of dense vs grouped
dispatch:
  {"layer": "ffn_experts", "active_frac": r, "dense_s": ..., "sparse_s": ..., "speedup": ...}
Then the whole default train step (T=512), twice per rate: with only the FFN experts routed at
``rate`` (attention untouched and dense), and with every site (q, k, v and FFN) at ``rate``
(both dispatches switched). Gates are set per expert to the (1 - rate) quantile of its routing
scores on the batch over all refinement steps; capacity = 1.5x the expected load (for attention
``attn_capacity_frac``: the union of the q, k and v active sets, which its shared dispatch
serves):
  {"sites": "ffn" | "q+k+v+ffn", "active_frac": r, "dense_s": ..., "sparse_s": ...,
   "speedup": dense/sparse, "overflow": pairs dropped for capacity, ...}
The FFN-only lines also time the same step without FFN experts (``none_s``; ``use_ffn=False``:
no FFN routing, experts, statistics sink or SARS site; attention, its library and its SARS
unchanged) and give the FFN experts' part of the train step: "ffn_dense_s" / "ffn_sparse_s"
(step time minus ``none_s``), "ffn_speedup" (their ratio) and "max_step_speedup" (dense_s /
none_s: the bound a free FFN would put on the whole-step speedup, Amdahl). The steps of one line
are timed round-robin, ``--reps`` rounds, minimum per step (``common.time_interleaved``).
"dense" is the default dense evaluation for the backend (``auto``: one expert at a time on CPU).
Usage: python bench/dispatch.py [--seq-len 512] [--reps 3] [--layer-only]
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from common import compiled_step, emit, random_batch, time_fn, time_interleaved

from tinyonn_jax.config import Config, ModelConfig
from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.sars import surprise
from tinyonn_jax.nn import experts, routing

DENSE = "auto"  # every expert on every token, evaluated the default way for this backend


def with_rate(cfg: Config, params: dict, batch: dict, rate: float, sites) -> dict:
    """Params whose gates make every expert of ``sites`` active for about ``rate`` of its rows.

    Per expert, gate = the (1 - rate) quantile of its scores over all steps; the inputs of later
    steps depend on the gates, so this is iterated, averaging each new gate with the last one
    (without the averaging the overall rate oscillates, e.g. 0.11 / 0.19 / 0.14 at 1/8). The
    gates are shared by all steps, so per step and expert the load still varies around ``rate``.
    """
    params = jax.tree.map(lambda x: x, params)
    for it in range(6):
        _, aux = tr.forward(params, batch["inputs"], cfg.model)
        for site in sites:
            leaf = params["block"]["ffn"] if site == "ffn" else params["block"]["attn"]
            sfx = "" if site == "ffn" else f"_{site}"
            u = aux.steps.expert_input(site)
            scores = routing.prototype_scores(u, leaf[f"proto{sfx}"],
                                              jnp.zeros_like(leaf[f"gate{sfx}"]))
            gate = jnp.quantile(scores.reshape(-1, scores.shape[-1]), 1.0 - rate, axis=0)
            leaf[f"gate{sfx}"] = gate if it == 0 else 0.5 * (leaf[f"gate{sfx}"] + gate)
    return params


def union_rate(cfg: Config, params: dict, batch: dict) -> float:
    """Share of (token, head, latent expert) pairs active for q, k or v."""
    _, aux = tr.forward(params, batch["inputs"], cfg.model)
    return float(jnp.mean(experts.union_mask([aux.steps.site(c).z > 0 for c in "qkv"])))


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
        def step(b, x, m=DENSE if mode == "dense" else mode):  # L = sum(A^2): g = dL/dA = 2A
            if experts.stats_sink_dispatch(m):  # statistics from the backward (as in training)
                sink = jnp.zeros((*z.shape, experts.NUM_STAT_CHANNELS))
                a, vjp = jax.vjp(lambda b, x, s: experts.apply_with_stats(b, x, z, s, m, frac),
                                 b, x, sink)
                *grads, raw = vjp(2.0 * a)
                return grads, surprise.stats_from_sink(z, None, raw, "attribution").goodness
            a, vjp = jax.vjp(lambda b, x: experts.apply(b, x, z, m, frac), b, x)
            g = 2.0 * a
            st = surprise.dense_token_stats(b, x, (z,), (g,), "attribution", m)[0]
            return vjp(g), st.goodness

        fn = jax.jit(step)
        out[f"{mode}_s"] = time_fn(fn, bank, u, reps=reps)
    out["speedup"] = out["dense_s"] / out["sparse_s"]
    out["overflow"] = int(experts.overflow_count(z > 0, k))
    return out


def loss_of(fn, batch: dict):
    """A train step as a timed call: state -> its loss (the metrics it waits for)."""
    return lambda state: fn(state, batch)[1]["train/loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layer-only", action="store_true")
    a = p.parse_args()
    for rate in (1 / 2, 1 / 8, 1 / 32):
        emit(ffn_layer(rate, 2048, a.reps))
    if a.layer_only:
        return
    batch = random_batch(1, a.seq_len)
    # The q, k, v library layout: the only one with a sparse attention dispatch to compare.
    base = Config(model=ModelConfig(max_len=max(4096, a.seq_len), attn_layout="qkv_routers"))
    params0 = modules.init_params(jax.random.key(0), base.model)
    for rate in (1 / 2, 1 / 8, 1 / 32):
        for sites in (("ffn",), ("q", "k", "v", "ffn")):
            params = with_rate(base, params0, batch, rate, sites)
            attn = "q" in sites
            out = {"sites": "+".join(sites), "active_frac": rate, "seq_len": a.seq_len,
                   "capacity_frac": min(1.0, 1.5 * rate)}
            if attn:  # the shared dispatch serves the union of q, k and v: size it for that
                out["attn_union_frac"] = union_rate(base, params, batch)
                out["attn_capacity_frac"] = min(1.0, 1.5 * out["attn_union_frac"])
            calls = {}
            for mode in ("dense", "sparse"):
                dispatch = DENSE if mode == "dense" else mode
                model = dataclasses.replace(base.model, ffn_dispatch=dispatch,
                                            attn_dispatch=dispatch if attn else DENSE,
                                            capacity_frac=out["capacity_frac"],
                                            attn_capacity_frac=out.get("attn_capacity_frac",
                                                                       0.0))
                cfg = dataclasses.replace(base, model=model)
                fn, state, _, _ = compiled_step(cfg, batch)
                calls[mode] = (loss_of(fn, batch), (state._replace(params=params),))
                if mode == "sparse":
                    _, aux = tr.forward(params, batch["inputs"], cfg.model)
                    out["measured_active_frac"] = float(jnp.mean(aux.steps.ffn.z > 0))
                    out["overflow"] = int(sum(jnp.sum(aux.steps.site(c).overflow)
                                              for c in sites))
            if not attn:  # the same step without FFN experts (see the module docstring)
                cfg = dataclasses.replace(base, model=dataclasses.replace(base.model,
                                                                          use_ffn=False))
                fn, state, _, _ = compiled_step(cfg, batch)
                calls["none"] = (loss_of(fn, batch), (state,))
            out.update({f"{k}_s": v for k, v in time_interleaved(calls, a.reps).items()})
            out["speedup"] = out["dense_s"] / out["sparse_s"]
            if not attn:
                dense, sparse = out["dense_s"] - out["none_s"], out["sparse_s"] - out["none_s"]
                out.update(ffn_dense_s=dense, ffn_sparse_s=sparse, ffn_speedup=dense / sparse,
                           max_step_speedup=out["dense_s"] / out["none_s"])
            emit(out)


if __name__ == "__main__":
    main()
