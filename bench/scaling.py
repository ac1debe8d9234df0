"""How step time, compile time and peak memory scale with refinement steps, sequence length and
the number of experts, measured side by side in one run on a mid-size DynTRM (hidden 128).

JSON lines: one per measurement, then the two checks of the design:
  {"check": "compile_time_16_vs_4_steps", "ratio": ...}   (target <= 1.3: lax.scan, not unrolled)
  {"check": "peak_memory_remat_16_vs_4_steps", "ratio": ...}  (target <= 1.5 with remat "full")
Peak memory is XLA's own accounting of the compiled train step (arguments + outputs + temporaries
- aliased), so it is exact for the program and independent of the allocator.
Usage: python bench/scaling.py [--reps 2] [--max-len 4096]
"""

from __future__ import annotations

import argparse
import dataclasses

from common import compiled_step, emit, random_batch, time_fn

from tinyonn_jax.config import Config, ModelConfig


def base_config() -> Config:
    """Hidden 128 in the qkv_routers layout (``common.with_layout`` says why)."""
    return Config(model=ModelConfig(hidden=128, num_heads=4, num_attn_experts=16,
                                    num_ffn_experts=8, ffn_mult=2, max_refinement_steps=4,
                                    max_len=4096, attn_layout="qkv_routers"))


def peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def measure(cfg: Config, batch: dict, reps: int, **tags) -> dict:
    fn, state, compiled, compile_s = compiled_step(cfg, batch)
    step_s = time_fn(lambda s: compiled(s, batch)[1]["train/loss"], state, reps=reps)
    out = dict(tags, compile_s=compile_s, step_s=step_s, peak_mb=peak_bytes(compiled) / 2**20)
    emit(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--max-len", type=int, default=4096)
    a = p.parse_args()
    base = base_config()
    batch = random_batch(1, 256)
    by_steps = {}
    for remat in ("none", "full"):
        for steps in (4, 8, 16):
            model = dataclasses.replace(base.model, max_refinement_steps=steps, remat=remat)
            by_steps[remat, steps] = measure(dataclasses.replace(base, model=model), batch,
                                             a.reps, sweep="steps", steps=steps, remat=remat,
                                             seq_len=256)
    length = 256
    while length <= a.max_len:
        measure(base, random_batch(1, length), 1 if length > 1024 else a.reps,
                sweep="seq_len", seq_len=length, steps=4)
        length *= 2
    for experts in (4, 8, 16, 32):
        model = dataclasses.replace(base.model, num_ffn_experts=experts)
        measure(dataclasses.replace(base, model=model), batch, a.reps, sweep="ffn_experts",
                ffn_experts=experts, seq_len=256, steps=4)
    emit({"check": "compile_time_16_vs_4_steps", "target": 1.3,
          "ratio": by_steps["none", 16]["compile_s"] / by_steps["none", 4]["compile_s"]})
    emit({"check": "peak_memory_remat_16_vs_4_steps", "target": 1.5,
          "ratio": by_steps["full", 16]["peak_mb"] / by_steps["full", 4]["peak_mb"]})
    emit({"check": "peak_memory_no_remat_16_vs_4_steps",
          "ratio": by_steps["none", 16]["peak_mb"] / by_steps["none", 4]["peak_mb"]})


if __name__ == "__main__":
    main()
