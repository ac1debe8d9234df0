"""One accelerator check: the accelerator-relevant tests, then train-step timings, as ONE JSON line.

Run once on a GPU/TPU machine (about 7 minutes at most, ``--budget``):
  1. pytest on tests/test_precision.py, test_attention_kernels.py, test_export.py,
     test_expert_parallel.py (those that exist), in a subprocess with a time limit;
  2. the DynTRM train step of the ``default`` model (B1 T1024) and of configs/arc_agi1.py
     (B1 T4096: its global batch 8 over 8 devices) under expert dispatch dense / sparse / scan,
     compute dtype bfloat16 / float32, remat none / full, and attention ``auto`` vs
     ``reference``; the cases run most informative first, each in its own subprocess (its own
     peak memory, a hung compile cannot hang the script) with a time limit, and the cases left
     when the budget is spent are listed as skipped.
Per case: compile seconds, the median of >= 3 timed steps after one warm-up step, tokens/s,
peak device memory (``device.memory_stats()["peak_bytes_in_use"]`` where the backend reports it,
else the compiled memory analysis), the FLOPs of one step and MFU = matmul FLOPs / step time /
the chip's dense bf16 peak (``PEAK_BF16_TFLOPS``; null for unknown chips and for CPUs).
XLA's cost analysis (``xla_flops``) counts a while loop's body once, not per iteration, so it
misses 7/8 of the refinement-step scan; ``matmul_flops`` counts every dot_general of the step's
jaxpr with scans multiplied by their length: the matmuls as executed, remat recomputation
included (hardware FLOPs; elementwise work left out, as usual for MFU).

``--smoke``: the same script on a CPU with tiny shapes (configs/tiny.py model, B2 T64, four
cases, a quick subset of the tests) in under 3 minutes; the JSON says ``"smoke": true``.
Usage: python bench/accelerator.py [--smoke] [--budget 420] [--case-timeout 150]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = ("tests/test_precision.py", "tests/test_attention_kernels.py",
              "tests/test_export.py", "tests/test_expert_parallel.py")
# Dense (no sparsity) bf16 peak of one chip in TFLOP/s, by a lower-case substring of JAX's
# device_kind; the first match wins (vendor data sheets: NVIDIA H100/H200 SXM, H100 PCIe, A100;
# Google Cloud TPU v4, v5e ("TPU v5 lite"), v5p ("TPU v5"), v6e ("TPU v6 lite")).
PEAK_BF16_TFLOPS = (("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("a100", 312.0),
                    ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0), ("v5", 459.0),
                    ("v6 lite", 918.0), ("v6e", 918.0), ("v4", 275.0))
SHAPES = {"default": (1, 1024), "arc_agi1": (1, 4096), "tiny": (2, 64)}


def peak_tflops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((v for k, v in PEAK_BF16_TFLOPS if k in kind), None)


def cases(smoke: bool, has_attention: bool) -> list[dict]:
    """The timed cases, most informative first (the budget may cut the tail)."""
    def case(config, dispatch, dtype, remat, attention="auto"):
        b, t = SHAPES[config]
        return dict(config=config, dispatch=dispatch, dtype=dtype, remat=remat,
                    attention=attention, batch=b, seq_len=t)

    if smoke:
        out = [case("tiny", "dense", "float32", "none"), case("tiny", "scan", "bfloat16", "full"),
               case("tiny", "sparse", "float32", "full")]
        if has_attention:
            out.append(case("tiny", "dense", "float32", "none", "reference"))
        return out
    first = (("dense", "bfloat16", "full"), ("dense", "float32", "full"),
             ("dense", "bfloat16", "none"), ("sparse", "bfloat16", "full"))
    rest = (("scan", "bfloat16", "full"), ("dense", "float32", "none"),
            ("sparse", "float32", "full"), ("sparse", "bfloat16", "none"))
    out = []
    for config in ("default", "arc_agi1"):
        out += [case(config, *c) for c in first]
        if has_attention:
            out.append(case(config, "dense", "bfloat16", "full", "reference"))
    for config in ("default", "arc_agi1"):
        out += [case(config, *c) for c in rest]
    return out


def run_tests(smoke: bool, limit: float) -> dict:
    """pytest on the accelerator-relevant test files that exist: rc, summary line, seconds."""
    files = [f for f in TEST_FILES if (ROOT / f).exists()]
    missing = [f for f in TEST_FILES if f not in files]
    workers = "0" if smoke else "4"  # the accelerator machine's cores, one device shared
    pytest = [sys.executable, "-m", "pytest", "-rf", "-p", "no:cacheprovider", "-n", workers]
    cmd = [*pytest, *files]
    if smoke:  # the platform checks only: the full files take minutes on a CPU
        files = ["tests/test_precision.py::-k auto_compute_dtype or defaults_to_auto"]
        cmd = [*pytest, "tests/test_precision.py", "-k", "auto_compute_dtype or defaults_to_auto"]
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        lines = [x for x in r.stdout.splitlines() if x.strip()]
        summary = lines[-1] if lines else r.stderr[-300:]
        failed = [x.split(" ")[1] for x in lines if x.startswith("FAILED ")]
        out = {"rc": r.returncode, "summary": summary, "failed": failed}
    except subprocess.TimeoutExpired:
        out = {"rc": None, "summary": f"timed out after {limit:.0f} s", "failed": []}
    return {**out, "files": files, "missing": missing, "seconds": time.perf_counter() - t}


def matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general of a (closed) jaxpr as it executes: 2 x output size x
    contraction size, a scan body times its length, a cond by its costliest branch, other nested
    jaxprs (jit, remat, custom derivatives) once; a while loop's body counts once."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            size = 1.0
            for d in eqn.outvars[0].aval.shape:
                size *= d
            for i in contract:
                size *= lhs[i]
            total += 2.0 * size
            continue
        subs = [v for value in eqn.params.values()
                for v in (value if isinstance(value, (tuple, list)) else (value,))
                if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns")]
        if not subs:
            continue
        costs = [matmul_flops(v) for v in subs]
        if eqn.primitive.name == "cond":
            total += max(costs)
        else:
            total += sum(costs) * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    return total


def run_case(spec: dict, reps: int) -> dict:
    """Compile and time one case in this process (``--case``); returns its record."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT / "bench"))
    from memory import shipped_config

    from tinyonn_jax.families.registry import get_family

    cfg = shipped_config(spec["config"])
    model = dataclasses.replace(
        cfg.model, compute_dtype=spec["dtype"], remat=spec["remat"],
        ffn_dispatch=spec["dispatch"],
        attn_dispatch=spec["dispatch"] if cfg.model.attn_layout == "qkv_routers" else "dense")
    if hasattr(model, "attention"):
        model = dataclasses.replace(model, attention=spec["attention"])
    cfg = dataclasses.replace(cfg, model=model)
    family = get_family(cfg)
    opt = family.build_optimizer(cfg)
    state = family.init_state(cfg, opt, jax.random.key(0))
    b, t = spec["batch"], spec["seq_len"]
    toks = jax.random.randint(jax.random.key(1), (b, t + 1), 8, cfg.model.vocab_size)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
             "weights": jnp.ones((b, t), jnp.float32), "segment_ids": jnp.ones((b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))}
    step = family.make_train_step(cfg, opt, donate=True)
    flops = matmul_flops(jax.make_jaxpr(step)(state, batch))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    mem = compiled.memory_analysis()
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak, source = stats["peak_bytes_in_use"], "memory_stats"
    else:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
        source = "memory_analysis"
    tflops = peak_tflops(device.device_kind) if device.platform != "cpu" else None
    return {**spec, "compile_s": compile_s, "step_s": step_s, "step_s_all": times,
            "tokens_per_s": b * t / step_s, "peak_bytes": int(peak), "peak_source": source,
            "matmul_flops": flops, "xla_flops": xla_flops,
            "mfu": flops / step_s / (tflops * 1e12) if tflops and flops else None,
            "loss": float(metrics["train/main_loss"])}


def run_case_subprocess(spec: dict, reps: int, limit: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(spec),
           "--reps", str(reps)]
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {limit:.0f} s"}
    line = next((x for x in reversed(r.stdout.splitlines()) if x.startswith("{")), None)
    if r.returncode != 0 or line is None:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1][-300:]
        return {**spec, "error": f"rc {r.returncode}: {tail}",
                "seconds": time.perf_counter() - t}
    return json.loads(line)


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": d.device_kind,
            "num_devices": jax.device_count(), "jax_version": jax.__version__,
            "peak_bf16_tflops": peak_tflops(d.device_kind) if d.platform != "cpu" else None}


def rounded(x):
    if isinstance(x, float):
        return round(x, 6)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, < 3 minutes")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds for everything (default 420, smoke 170)")
    p.add_argument("--case-timeout", type=float, default=150.0)
    p.add_argument("--test-timeout", type=float, default=0.0,
                   help="seconds for the tests (default 180, smoke 40)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per case (>= 3)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--case", help=argparse.SUPPRESS)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.case:  # one case, in its own process
        from tinyonn_jax.runtime import configure_xla_cpu

        configure_xla_cpu()
        print(json.dumps(run_case(json.loads(a.case), max(a.reps, 3))), flush=True)
        return
    start = time.perf_counter()
    budget = a.budget or (170.0 if a.smoke else 420.0)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # per-case peaks, not 75%
    record = {"bench": "accelerator", "smoke": a.smoke}
    if a.skip_tests:
        record["tests"] = None
    else:
        limit = a.test_timeout or (40.0 if a.smoke else 180.0)
        record["tests"] = run_tests(a.smoke, min(limit, budget / 2))
    from tinyonn_jax.families.dyntrm.config import ModelConfig

    done, skipped = [], []
    for spec in cases(a.smoke, hasattr(ModelConfig(), "attention")):
        left = budget - (time.perf_counter() - start)
        if left < 20.0:
            skipped.append(spec)
            continue
        done.append(run_case_subprocess(spec, max(a.reps, 3), min(a.case_timeout, left)))
    from tinyonn_jax.runtime import configure_xla_cpu

    configure_xla_cpu()
    record.update(device_info())
    record.update(cases=done, skipped_cases=skipped, budget_s=budget,
                  elapsed_s=time.perf_counter() - start)
    print(json.dumps(rounded(record)), flush=True)


if __name__ == "__main__":
    main()
