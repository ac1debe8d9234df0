"""Train-step time with XLA's default CPU settings vs ``tinyonn_jax.runtime.CPU_FLAGS``.

XLA reads its flags once per process, so each setting runs in its own child process, one after
the other, in this one run. One JSON line per config (tiny, then default):
  {"config": ..., "xla_default_s": ..., "tuned_s": ..., "speedup": xla_default_s / tuned_s}
Usage: python bench/xla_flags.py [--seq-len 512] [--reps 3] [--configs tiny,default]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(name: str, seq_len: int, reps: int) -> None:
    from common import compiled_step, random_batch, time_fn, with_layout

    from tinyonn_jax.config import Config
    from tinyonn_jax.trainer import load_config

    # The default size in the qkv_routers layout (``common.with_layout`` says why).
    cfg = (with_layout(Config(), "qkv_routers") if name == "default"
           else load_config(HERE.parent / "configs" / f"{name}.py"))
    batch = random_batch(1, seq_len)
    _, state, compiled, _ = compiled_step(cfg, batch)
    step_s = time_fn(lambda s: compiled(s, batch)[1]["train/loss"], state, reps=reps)
    print(json.dumps({"step_s": step_s, "xla_flags": os.environ.get("XLA_FLAGS", "")}))


def run_child(name: str, seq_len: int, reps: int, tuned: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["TINYONN_XLA_CPU_TUNING"] = "1" if tuned else "0"
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name,
                          "--seq-len", str(seq_len), "--reps", str(reps)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--configs", default="tiny,default")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.seq_len, a.reps)
    from common import emit

    for name in a.configs.split(","):
        base = run_child(name, a.seq_len, a.reps, tuned=False)
        tuned = run_child(name, a.seq_len, a.reps, tuned=True)
        emit({"config": name, "seq_len": a.seq_len, "xla_default_s": base["step_s"],
              "tuned_s": tuned["step_s"], "speedup": base["step_s"] / tuned["step_s"],
              "tuned_flags": tuned["xla_flags"]})


if __name__ == "__main__":
    main()
