"""``nn.attention.attend``: every implementation that runs on this machine equals the float32
reference, forward and gradients, on packed rows with padding; decoding shapes; the ``auto``
rule; every family wired to its config's ``attention`` field.

On a CPU: ``xla`` is ``jax.nn.dot_product_attention``; ``pallas`` (the GPU flash kernel) and
``splash`` (the TPU kernel) run in Pallas interpret mode; ``cudnn`` needs an NVIDIA GPU.

Tolerances (float32, values of order 1): the kernels sum the same products in another order
(blockwise online softmax), so they differ from the reference by a few float32 ulps of the
largest terms, measured 3.6e-7 on outputs and 1.2e-6 on gradients here; 2e-5 / 5e-5 leave
room for other CPUs while a wrong mask, scale or segment (errors of order 0.1) fails. bfloat16 is
compared with the reference on the same bfloat16 inputs: both round probabilities and outputs
to bfloat16 (relative 2^-8), measured 1.6e-2 (one bfloat16 ulp of outputs in [2, 4)), checked
at 4e-2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_FAMILY_CONFIGS, packed_batch

from tinyonn_jax.config import DynOnnConfig, ModelConfig, SplConfig
from tinyonn_jax.errors import ConfigError
from tinyonn_jax.families.registry import get_family
from tinyonn_jax.nn import attention

B, T, H, DH = 3, 128, 2, 16  # T: one KERNEL_BLOCK, the splash tile
KERNELS = [i for i in attention.implementations_available(interpret=True) if i != "reference"]
# Rows with 1, 2 and 3 segments, then padding (segment 0).
LENGTHS = ((100,), (60, 40), (30, 50, 20))


def _segments() -> jax.Array:
    rows = []
    for lengths in LENGTHS:
        ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
        rows.append(np.pad(ids, (0, T - len(ids))))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _qkv(dtype=jnp.float32, tq: int = T, tk: int = T) -> tuple[jax.Array, ...]:
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (B, tq, H, DH), dtype),
            jax.random.normal(kk, (B, tk, H, DH), dtype),
            jax.random.normal(kv, (B, tk, H, DH), dtype))


def _close(got, want, tol):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=tol, rtol=tol)


def test_reference_is_the_causal_segment_local_softmax():
    """The oracle itself, against a per-row loop over each segment's own causal attention."""
    q, k, v = _qkv()
    seg = _segments()
    got = attention.attend(q, k, v, seg, implementation="reference")
    for b in range(B):
        for s in np.unique(np.asarray(seg[b])):
            idx = np.flatnonzero(np.asarray(seg[b]) == s)
            qs, ks, vs = (np.asarray(a[b, idx], np.float64) for a in (q, k, v))
            logits = np.einsum("qhd,khd->hqk", qs, ks) / np.sqrt(DH)
            logits = np.where(np.tril(np.ones((len(idx), len(idx)), bool)), logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            want = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), vs)
            _close(got[b, idx], want, 2e-5)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_equal_the_reference_forward_and_gradients(impl):
    q, k, v = _qkv()
    seg = _segments()
    weights = jax.random.normal(jax.random.key(5), (B, T, H, DH)) * (seg > 0)[..., None, None]

    def loss(q, k, v, implementation):
        o = attention.attend(q, k, v, seg, implementation=implementation)
        return jnp.sum(weights * o), o

    (_, want), want_g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, "reference")
    (_, got), got_g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, impl)
    assert got.shape == want.shape and got.dtype == want.dtype
    _close(got, want, 2e-5)  # padding rows included: every implementation has the same mask
    for g, w in zip(got_g, want_g, strict=True):
        _close(g, w, 5e-5)


@pytest.mark.parametrize("impl", KERNELS)
def test_a_kernel_serves_several_jitted_functions(impl):
    """Kernels built once and reused (the splash kernel is cached per shape) hold constants,
    not the tracers of the first function that built them."""
    q, k, v = _qkv()
    seg = _segments()
    first = jax.jit(lambda q: attention.attend(q, k, v, seg, implementation=impl))(q)
    second = jax.jit(lambda q: 2.0 * attention.attend(q, k, v, seg, implementation=impl))(q)
    _close(second, 2.0 * first, 1e-6)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_equal_the_reference_in_bfloat16(impl):
    q, k, v = _qkv(jnp.bfloat16)
    seg = _segments()
    want = attention.attend(q, k, v, seg, implementation="reference")
    got = attention.attend(q, k, v, seg, implementation=impl)
    assert got.dtype == jnp.bfloat16 and got.shape == want.shape
    _close(got, want, 4e-2)


def test_decoding_one_query_against_a_cache_equals_the_full_sequence():
    """Tq = 1 at slot s over a cache of T slots with per-row left padding (keys >= pad and
    <= s visible; later slots hold garbage) == the packed attention of the whole row at s."""
    q, k, v = _qkv()
    pad = jnp.array([0, 5, 37], jnp.int32)
    slots = jnp.arange(T)
    seg = (slots[None] >= pad[:, None]).astype(jnp.int32)  # 0 = left padding, 1 = the prompt
    full = attention.attend(q, k, v, seg, implementation="reference")
    for slot in (40, 77, T - 1):
        later = slots > slot  # the cache after the query: not written yet, random here
        kc = jnp.where(later[None, :, None, None], 9.0, k)
        layout = dict(kv_segment_ids=seg, q_slots=jnp.full((B, 1), slot),
                      kv_slots=jnp.broadcast_to(slots, (B, T)))
        for impl in ("reference", *KERNELS):
            got = attention.attend(q[:, slot:slot + 1], kc, v, jnp.ones((B, 1), jnp.int32),
                                   implementation=impl, **layout)
            assert got.shape == (B, 1, H, DH)
            _close(got[:, 0], full[:, slot], 2e-5)


def test_auto_is_the_reference_on_cpu_and_follows_the_platform_rule():
    q, k, v = _qkv()
    seg = _segments()
    assert attention.resolve("auto", q, k, packed=True, platform_name="cpu") == "reference"
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(attention.attend(q, k, v, seg),
                                      attention.attend(q, k, v, seg, implementation="reference"))
        assert attention.implementations_available() == ("reference", "xla")
    half = q.astype(jnp.bfloat16)
    rule = [  # (q, k, packed, platform) -> implementation
        ((half, half, True, "gpu"), "cudnn"),
        ((half[:, :1], half, False, "gpu"), "cudnn"),  # decoding: one query
        ((half[..., :12], half[..., :12], True, "gpu"), "pallas"),  # head width not 8k
        ((q, k, True, "gpu"), "pallas"),  # float32
        ((q[:, :100], k[:, :100], True, "gpu"), "reference"),  # not whole tiles
        ((q, k, True, "tpu"), "splash"),
        ((q[:, :1], k, False, "tpu"), "reference"),
        ((half[:, :100], half[:, :100], True, "tpu"), "reference"),
    ]
    for (qq, kk, packed, plat), want in rule:
        assert attention.resolve("auto", qq, kk, packed=packed, platform_name=plat) == want
    # The packed-row kernels give way to auto's choice where the layout is not packed rows.
    assert attention.resolve("splash", q[:, :1], k, packed=False, platform_name="tpu") == \
        "reference"
    with pytest.raises(ValueError, match="flash"):
        attention.resolve("flash", q, k, packed=True)


@pytest.mark.parametrize("section", [ModelConfig, SplConfig, DynOnnConfig])
def test_config_field_is_validated(section):
    assert section().attention == "auto"
    with pytest.raises(ConfigError, match="attention"):
        section(attention="flash")


def _model_variants() -> dict:
    """The tiny config of every family, and DynTRM's other attention layouts."""
    dyntrm = TINY_FAMILY_CONFIGS["dyntrm"]
    return {**TINY_FAMILY_CONFIGS, **{
        f"dyntrm_{k}": dataclasses.replace(dyntrm, model=dataclasses.replace(dyntrm.model, **kw))
        for k, kw in (("mha", {"attn_kind": "mha"}),
                      ("qkv_routers", {"attn_layout": "qkv_routers"}))}}


@pytest.mark.parametrize("name", sorted(_model_variants()))
def test_every_family_runs_its_configured_attention(name, monkeypatch):
    """Every attention call of a family runs the config's ``attention`` (each call asks for it),
    and its logits on packed rows with padding are the same with the reference and with the
    Pallas GPU kernel (interpret mode)."""
    asked = []
    resolve = attention.resolve

    def recording_resolve(implementation, *args, **kw):
        asked.append(implementation)
        return resolve(implementation, *args, **kw)

    monkeypatch.setattr(attention, "resolve", recording_resolve)
    cfg = _model_variants()[name]
    family = get_family(cfg)
    batch = packed_batch()
    params, extras = family.init(jax.random.key(0), cfg)

    def logits(impl):
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=impl))
        return family.logits(params, extras, batch["inputs"], c, positions=batch["positions"],
                             segment_ids=batch["segment_ids"])

    want = logits("reference")
    asked.clear()
    _close(logits("pallas"), want, 5e-5)
    assert asked and set(asked) == {"pallas"}
