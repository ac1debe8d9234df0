"""SARS overhead: full train step (probes, per-expert statistics, meta loss and update) vs the
main-only train step (plain value_and_grad, SARS off), same batch, both jitted, compile excluded.

Prints one JSON line per config: configs/tiny.py (DynSIHA+ in the seed's latent-head layout),
the same with the qkv_routers layout, the default size with qkv_routers (``common.with_layout``):
  {"config": ..., "full_step_s": ..., "main_only_step_s": ..., "ratio": full / main_only}
Usage: python bench/sars_overhead.py [--seq-len 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from common import emit, time_fn, with_layout

from tinyonn_jax.config import Config, DataConfig, SarsConfig
from tinyonn_jax.families.dyntrm.family import DYNTRM
from tinyonn_jax.trainer import load_config


def _batch(t: int, key) -> dict:
    toks = jax.random.randint(key, (1, t + 1), 8, 18)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "weights": jnp.ones((1, t)),
            "segment_ids": jnp.ones((1, t), jnp.int32),
            "positions": jnp.arange(t, dtype=jnp.int32)[None]}


def measure(name: str, cfg: Config, t: int, reps: int) -> dict:
    batch = _batch(t, jax.random.key(1))
    out = {"config": name, "seq_len": t}
    for label, sars in (("full_step_s", cfg.sars),
                        ("main_only_step_s", dataclasses.replace(cfg.sars, enabled=False))):
        c = dataclasses.replace(cfg, sars=sars)
        opt = DYNTRM.build_optimizer(c)
        state = DYNTRM.init_state(c, opt, jax.random.key(0))
        step = DYNTRM.make_train_step(c, opt, donate=False)
        out[label] = time_fn(lambda s, f=step: f(s, batch)[1]["train/loss"], state, reps=reps)
    out["ratio"] = out["full_step_s"] / out["main_only_step_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    tiny = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    default = Config(sars=SarsConfig(), data=DataConfig())
    for name, cfg in (("tiny", tiny), ("tiny_qkv_routers", with_layout(tiny, "qkv_routers")),
                      ("default_qkv_routers", with_layout(default, "qkv_routers"))):
        emit(measure(name, cfg, a.seq_len, a.reps))


if __name__ == "__main__":
    main()
