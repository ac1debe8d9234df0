"""Shared helpers of the benchmark scripts: timing with compile excluded, JSON lines."""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinyonn_jax.families.dyntrm.family import DYNTRM
from tinyonn_jax.runtime import configure_xla_cpu  # noqa: E402

configure_xla_cpu()  # before any benchmark starts a JAX backend


def time_fn(fn, *args, reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn(*args)`` in seconds, blocking on the result, compile excluded."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_interleaved(calls: dict, reps: int = 3) -> dict:
    """Wall time of each ``{name: (fn, args)}``, compile excluded, timed round-robin.

    Every call runs once to warm up, then ``reps`` rounds time each call once in turn, so a slow
    period of a shared machine hits all of them alike; returns ``{name: minimum over rounds}``
    (interference only ever adds time).
    """
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, (fn, args) in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}


def emit(record: dict) -> None:
    """Print one JSON line (the machine-readable result) and flush."""
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v)
                      for k, v in record.items()}), flush=True)


def random_batch(batch: int, length: int, seed: int = 1) -> dict:
    """A full, unpacked batch of colour tokens (B, T): the shapes of a real training batch."""
    import jax.numpy as jnp

    toks = jax.random.randint(jax.random.key(seed), (batch, length + 1), 8, 18)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
            "weights": jnp.ones((batch, length), jnp.float32),
            "segment_ids": jnp.ones((batch, length), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))}


def compiled_step(cfg, batch: dict, donate: bool = False):
    """(jitted step, initial state, compiled executable, compile seconds) of the DynTRM family."""

    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    fn = DYNTRM.make_train_step(cfg, opt, donate=donate)
    t = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    return fn, state, compiled, time.perf_counter() - t


def with_layout(cfg, layout: str):
    """``cfg`` with DynSIHA+ in ``layout``. The default-size lines pin ``qkv_routers``: with the
    seed's latent heads the exact per-token SARS cost of the key projections under RoPE is
    about hidden/2 times the attention's own work (``sars/heads.py``), out of reach on a CPU
    at hidden 512; the tiny lines measure both layouts."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_layout=layout))
