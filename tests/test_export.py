"""The train step of every family and generation lower for CUDA and TPU from this CPU host.

``jax.export`` lowers a jitted function for a platform that is not present: what a GPU or TPU
job would compile. ``traced_for`` makes the model trace as on that platform (``backend.platform``
answers it), so ``compute_dtype="auto"`` gives bfloat16 (parameters and routing stay float32)
and ``attention="auto"`` and the kernels choose as there: the Pallas Triton kernel for cuda,
the Mosaic splash kernel for tpu, not their CPU interpret mode. Each export is checked for its
platform, its input and output shapes and dtypes (a train step returns a state shaped like the
one it takes; a decode step a cache shaped like its input) and a serialize / deserialize round
trip. The functions are exported on flat lists of arrays: the serialized form then needs no
pytree registrations of optax or train-state classes. Lowering only, nothing is compiled.

Attention implementations per platform (``nn.attention.IMPLEMENTATIONS``): cuda ``reference``,
``xla``, ``pallas`` (a Triton custom call, exported with its stability check disabled: jax
guarantees no compatibility for it) and ``cudnn`` (and ``auto`` where it picks cuDNN), which
only trace on a machine with a CUDA GPU (``CUDNN_NEEDS_GPU``) and are skipped here; tpu
``reference``, ``xla``, ``splash`` and ``auto``. ``pallas`` on tpu and ``splash`` on cuda are
not kernels of that platform (they would lower their interpret mode) and are not exported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from conftest import TINY_FAMILY_CONFIGS, tiny_batch

from tinyonn_jax import backend
from tinyonn_jax.config import Config
from tinyonn_jax.eval import generate
from tinyonn_jax.eval.recompute import FamilyLogits, generate_by_recompute
from tinyonn_jax.families.registry import get_family
from tinyonn_jax.nn import attention

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ("cuda", "tpu")
TARGET = {"cuda": "gpu", "tpu": "tpu"}  # backend.platform's name of an export platform
# Expert dispatch "auto" reads jax.default_backend(); dense is what it picks on gpu and tpu.
ACCELERATOR_DEFAULTS = {"attn_dispatch": "dense", "ffn_dispatch": "dense"}
TRITON = "__gpu$xla.gpu.triton"  # the custom call of a Pallas GPU kernel
MOSAIC = "tpu_custom_call"  # the custom call of a Pallas TPU kernel
CUDNN_NEEDS_GPU = ("cuDNN attention traces only on a machine with a CUDA GPU: "
                   "jax.nn.dot_product_attention(implementation='cudnn') reads the installed "
                   "cuDNN version (jax's CUDA plugin) and the GPU's compute capability while it "
                   "is traced")
KERNEL_T = attention.KERNEL_BLOCK  # a sequence length at which "auto" picks the kernels


@contextlib.contextmanager
def traced_for(platform: str):
    """Trace as on ``platform``: ``backend.platform()`` answers its name. JAX's trace caches
    (inner jitted functions) and the cached splash kernels are cleared on entry and exit, so
    no trace made for one platform is reused for another or by later tests."""
    host = backend.platform

    def clear():
        jax.clear_caches()
        kernel = getattr(attention, "_splash_kernel", None)
        if hasattr(kernel, "cache_clear"):
            kernel.cache_clear()

    clear()
    try:
        with mock.patch.object(backend, "platform", lambda name=None: host(name or
                                                                          TARGET[platform])):
            try:
                yield
            except RuntimeError as e:
                if "cuDNN is not detected" in str(e):
                    pytest.skip(CUDNN_NEEDS_GPU)
                raise
    finally:
        clear()


def accelerator_config(cfg: Config, **model) -> Config:
    """``cfg`` with the accelerator defaults of the fields its model has, plus ``model``."""
    names = {f.name for f in dataclasses.fields(cfg.model)}
    over = {k: v for k, v in ACCELERATOR_DEFAULTS.items() if k in names}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **over, **model))


def flat_jit(fn, *args, **jit_kw):
    """(jitted function of the flat leaves of ``args`` returning the flat leaves of
    ``fn(*args)``, those input leaves)."""
    leaves, tree = jax.tree.flatten(args)

    def flat(*xs):
        return tuple(jax.tree.leaves(fn(*jax.tree.unflatten(tree, xs))))

    return jax.jit(flat, **jit_kw), leaves


def avals(xs) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(x.shape), str(x.dtype)) for x in xs]


def export_checked(fn, leaves, platform: str, triton: bool = False):
    """Export ``fn`` (a ``flat_jit``) for ``platform``; checks the platform, the input and
    output avals against ``jax.eval_shape`` and the serialization round trip. ``triton``:
    allow the custom call of the Pallas GPU kernels."""
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)] if triton else []
    exp = jax.export.export(fn, platforms=(platform,), disabled_checks=checks)(*leaves)
    assert exp.platforms == (platform,)
    assert avals(exp.in_avals) == avals(leaves)
    assert avals(exp.out_avals) == avals(jax.eval_shape(fn, *leaves))
    back = jax.export.deserialize(exp.serialize())
    assert back.platforms == exp.platforms and back.nr_devices == exp.nr_devices == 1
    assert avals(back.in_avals) == avals(exp.in_avals)
    assert avals(back.out_avals) == avals(exp.out_avals)
    assert back.mlir_module_serialized == exp.mlir_module_serialized
    return exp


def train_step_parts(cfg: Config, b: int = 2, t: int = KERNEL_T):
    """(step as the trainer jits it, abstract state, abstract batch)."""
    family = get_family(cfg)
    optimizer = family.build_optimizer(cfg)
    state = jax.eval_shape(lambda k: family.init_state(cfg, optimizer, k), jax.random.key(0))
    batch = jax.eval_shape(lambda: tiny_batch(cfg, b=b, t=t))
    return functools.partial(family.train_step, cfg=cfg, optimizer=optimizer), state, batch


# (family, platform, attention): the defaults and kernels of every family, the XLA forms once.
TRAIN_CASES = [
    *[(n, p, a) for n in sorted(TINY_FAMILY_CONFIGS)
      for p, a in (("cuda", "auto"), ("cuda", "pallas"), ("tpu", "auto"))],
    *[("dyntrm", p, a) for p in PLATFORMS for a in ("reference", "xla")],
    ("dyntrm", "cuda", "cudnn"),
]
# The kernel's custom call in the lowered module ("auto" on cuda picks pallas where it lowers
# here: cuDNN is skipped).
KERNEL_CALL = {("cuda", "pallas"): TRITON, ("cuda", "auto"): TRITON, ("tpu", "auto"): MOSAIC,
               ("tpu", "splash"): MOSAIC}


@pytest.mark.parametrize("name,platform,impl", TRAIN_CASES)
def test_train_step_exports(name, platform, impl):
    cfg = accelerator_config(TINY_FAMILY_CONFIGS[name], attention=impl)
    step, state, batch = train_step_parts(cfg)
    n_state = len(jax.tree.leaves(state))
    fn, leaves = flat_jit(step, state, batch, donate_argnums=tuple(range(n_state)))
    with traced_for(platform):
        exp = export_checked(fn, leaves, platform, triton=platform == "cuda")
    # The new state has the shapes and dtypes of the old one; the rest are metrics.
    assert avals(exp.out_avals[:n_state]) == avals(exp.in_avals[:n_state])
    module = exp.mlir_module()
    assert "bf16" in module  # compute_dtype "auto" is bfloat16 on the accelerator
    calls = [c for c in (TRITON, MOSAIC) if c in module]
    assert calls == ([KERNEL_CALL[platform, impl]] if (platform, impl) in KERNEL_CALL else [])


def _dyntrm_generation_parts(impl: str, b: int = 2, tp: int = 6, new: int = 3):
    cfg = accelerator_config(TINY_FAMILY_CONFIGS["dyntrm"], attention=impl)
    params = jax.eval_shape(lambda k: get_family(cfg).init(k, cfg)[0], jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((b, tp), jnp.int32)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    return cfg.model, params, tokens, lengths, tp + new - 1


@pytest.mark.parametrize("platform,impl", [("cuda", "xla"), ("cuda", "auto"), ("tpu", "auto")])
def test_dyntrm_prefill_and_decode_step_export(platform, impl):
    mcfg, params, tokens, lengths, cache_len = _dyntrm_generation_parts(impl)
    prefill = functools.partial(generate.prefill, cfg=mcfg, cache_len=cache_len)
    fn, leaves = flat_jit(prefill, params, tokens, lengths)
    with traced_for(platform):
        exp = export_checked(fn, leaves, platform)
    b = tokens.shape[0]
    logits, cache_k, cache_v, depth = exp.out_avals
    assert avals([logits, depth]) == [((b, mcfg.vocab_size), "float32"), ((b,), "int32")]
    s, t_max = mcfg.max_refinement_steps, cache_len
    assert cache_k.shape[:2] == (s, b) and cache_k.shape[3] == t_max
    assert str(cache_k.dtype) == "bfloat16" and avals([cache_v]) == avals([cache_k])

    cache = generate.KVCache(cache_k, cache_v)
    vec = jax.ShapeDtypeStruct((b,), jnp.int32)
    slot = jax.ShapeDtypeStruct((), jnp.int32)
    decode = functools.partial(generate.decode_step, cfg=mcfg)
    fn, leaves = flat_jit(lambda p, t, sl, pad, c, d: decode(p, t, sl, pad, c, depth=d),
                          params, vec, slot, vec, cache, vec)
    with traced_for(platform):
        exp = export_checked(fn, leaves, platform)
    logits, k, v = exp.out_avals
    assert avals([logits]) == [((b, mcfg.vocab_size), "float32")]
    assert avals([k, v]) == avals([cache_k, cache_v])  # the cache is updated in place


@pytest.mark.parametrize("platform", PLATFORMS)
def test_dynonn_generation_by_recompute_exports(platform):
    cfg = accelerator_config(TINY_FAMILY_CONFIGS["dynonn"])
    family = get_family(cfg)
    state = jax.eval_shape(lambda k: family.init(k, cfg), jax.random.key(0))
    b, tp, new = 2, 6, 3
    gen = functools.partial(generate_by_recompute, FamilyLogits(family, cfg), max_new_tokens=new)
    fn, leaves = flat_jit(gen, state, jax.ShapeDtypeStruct((b, tp), jnp.int32),
                          jax.ShapeDtypeStruct((b,), jnp.int32))
    with traced_for(platform):
        exp = export_checked(fn, leaves, platform)
    assert avals(exp.out_avals) == [((b, new), "int32"), ((b,), "int32"), ((b,), "float32")]


# Runs in a fresh process with 8 CPU devices: the train step of every family on a 2x2
# (data, expert) mesh of 4 of them, exported for cuda with its shardings.
SHARDED = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import jax
import test_export
print("RESULT" + json.dumps(test_export.sharded_exports()))
"""


def sharded_exports(platform: str = "cuda") -> dict:
    """{family: what its sharded export records} on a 2x2 mesh of CPU devices; attention
    ``xla`` (``auto`` would pick cuDNN, which does not trace here)."""
    from tinyonn_jax import parallel

    out = {}
    for name in sorted(TINY_FAMILY_CONFIGS):
        base = accelerator_config(TINY_FAMILY_CONFIGS[name], attention="xla")
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, mesh_data=2,
                                                                  mesh_expert=2))
        mesh = parallel.make_mesh(cfg.train, jax.devices()[:4])
        step, state, batch = train_step_parts(cfg, b=4, t=8)
        state_sh = parallel.state_shardings(mesh, state, get_family(cfg).expert_axes(cfg))
        batch_sh = dict.fromkeys(batch, parallel.batch_sharding(mesh))
        in_sh = jax.tree.leaves((state_sh, batch_sh))
        n_state = len(jax.tree.leaves(state))
        fn, leaves = flat_jit(step, state, batch, in_shardings=in_sh,
                              donate_argnums=tuple(range(n_state)))
        want = [str(s.spec) for s in in_sh]
        with traced_for(platform):
            exp = jax.export.export(fn, platforms=(platform,))(*leaves)
        back = jax.export.deserialize(exp.serialize())
        out[name] = {
            "platforms": list(back.platforms), "nr_devices": back.nr_devices,
            "specs_match": [str(s.spec) for s in back.in_shardings_jax(mesh)] == want,
            "expert_split": sum("expert" in s for s in want),
            "out_state_match": avals(back.out_avals[:n_state]) == avals(leaves[:n_state])}
    return out


def test_sharded_train_step_exports_on_a_2x2_mesh():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    script = SHARDED.format(root=str(ROOT), tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert sorted(res) == sorted(TINY_FAMILY_CONFIGS)
    for name, r in res.items():
        assert r["platforms"] == ["cuda"] and r["nr_devices"] == 4, name
        assert r["specs_match"] and r["out_state_match"], name
        assert r["expert_split"] > 0, name  # some parameters are split over the expert axis
