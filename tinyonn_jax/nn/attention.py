"""Attention primitives shared by every family: head split, RoPE, the causal segment-local mask,
float32 softmax attention and ``attend``, the one attention call of every model, which runs it
with the naive reference, XLA, cuDNN, the Pallas GPU flash kernel or the TPU splash kernel.
Shapes: (B, T, H, Dh) per head, masks (B, Tq, Tk)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tinyonn_jax import backend

# The ``attention`` field of every model config. ``pallas``: the Pallas GPU flash attention
# (Triton); ``splash``: the Pallas TPU splash attention.
IMPLEMENTATIONS = ("auto", "reference", "xla", "cudnn", "pallas", "splash")
KERNEL_BLOCK = 128  # sequence tile of the Pallas kernels (auto: T must be a multiple)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, T, D) -> (B, T, H, D/H)."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def axis_pairs(half: int, axes: int) -> tuple[int, ...]:
    """How many of the ``half`` rotation pairs each position axis gets: one axis takes all; with
    three (grid, row, column) the grid index takes a quarter (at least one), the rest split
    evenly between row and column, the column taking any odd one."""
    if axes == 1:
        return (half,)
    grid = max(1, half // 4)
    row = (half - grid) // 2
    return (grid, row, half - grid - row)


def rope_angles(positions: jax.Array, half: int, base: float) -> jax.Array:
    """Rotation angle of each of the ``half`` pairs: positions (B,T) or (B,T,A) -> (B,T,half).

    Each axis gets its own contiguous block of pairs (``axis_pairs``) with frequencies
    ``base ** (-j / n)`` for j < n, the block's size n; one axis is the usual 1D RoPE ladder.
    """
    pos = positions.astype(jnp.float32)
    if pos.ndim == 2:
        pos = pos[..., None]
    blocks = []
    for a, n in enumerate(axis_pairs(half, pos.shape[-1])):  # static: A <= 3 blocks
        freqs = base ** (-jnp.arange(n, dtype=jnp.float32) / n)
        blocks.append(pos[..., a:a + 1] * freqs)
    return jnp.concatenate(blocks, axis=-1)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary position encoding over the last axis: x (B,T,H,Dh), positions (B,T) (1D) or
    (B,T,A) (one coordinate per axis, ``rope_angles``); pair i is (x_i, x_{i + Dh/2})."""
    half = x.shape[-1] // 2
    angles = rope_angles(positions, half, base)[..., None, :]  # (B,T,1,half)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array,
                   k_seg: jax.Array) -> jax.Array:
    """Causal, segment-local mask (B, Tq, Tk) from absolute slot indices and segment ids."""
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    return causal & (q_seg[:, :, None] == k_seg[:, None, :])


def packed_mask(segment_ids: jax.Array) -> jax.Array:
    """Causal, segment-local mask (B, T, T) of a packed batch whose slots are in order."""
    slots = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
    return attention_mask(slots, slots, segment_ids, segment_ids)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array) -> jax.Array:
    """Softmax attention in float32: q (B,Tq,H,Dh), k/v (B,Tk,H,Dh), mask (B,Tq,Tk) -> (B,Tq,H,Dh).

    Every query must be allowed at least one key (itself), so no row is all -inf.
    """
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _visible(q: jax.Array, k: jax.Array, segment_ids: jax.Array,
             kv_segment_ids: jax.Array | None, q_slots: jax.Array | None,
             kv_slots: jax.Array | None) -> jax.Array:
    """The boolean mask (B, Tq, Tk) of ``attend``'s arguments."""
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    q_slots = jnp.broadcast_to(jnp.arange(tq), (b, tq)) if q_slots is None else q_slots
    kv_slots = jnp.broadcast_to(jnp.arange(tk), (b, tk)) if kv_slots is None else kv_slots
    kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
    return attention_mask(q_slots, kv_slots, segment_ids, kv_segment_ids)


def _cudnn_head_dim_max() -> int:
    """Largest head width cuDNN flash attention takes: 256 from Hopper (sm 9.0) on, else 128."""
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    return 256 if float(capability) >= 9.0 else 128


def implementations_available(platform_name: str | None = None, *,
                              interpret: bool = False) -> tuple[str, ...]:
    """The implementations ``attend`` can run on ``platform_name`` (``backend.platform``;
    default JAX's default backend), ``auto`` excluded: ``reference`` and ``xla`` everywhere,
    ``cudnn`` and ``pallas`` on gpu, ``splash`` on tpu. With ``interpret`` also the Pallas
    kernels that run off their platform in interpret mode (slow; for tests)."""
    native = {"cpu": (), "gpu": ("cudnn", "pallas"), "tpu": ("splash",)}
    kernels = native[backend.platform(platform_name)] + (("pallas", "splash") if interpret else ())
    return ("reference", "xla", *dict.fromkeys(kernels))


def resolve(implementation: str, q: jax.Array, k: jax.Array, *, packed: bool,
            platform_name: str | None = None) -> str:
    """The implementation ``attend`` runs: ``implementation`` itself unless it is ``auto``.

    ``auto`` on the platform (``backend.platform``, default JAX's default backend at trace
    time; lowering for another platform, e.g. ``jax.export`` for cuda from a CPU host, resolves
    on the host, so name the implementation there):

    - cpu: ``reference``.
    - gpu: ``cudnn`` when the layout fits cuDNN flash attention: q in bfloat16 or float16,
      head width a multiple of 8 and at most 128 (256 from Hopper on), and Tq, Tk even or a
      single query (decoding); else ``pallas`` for packed rows whose length is a multiple of
      ``KERNEL_BLOCK``; else ``reference``.
    - tpu: ``splash`` for packed rows whose length is a multiple of ``KERNEL_BLOCK``; else
      ``reference``.

    Packed rows: self-attention in slot order with one segment-id array (``attend`` without
    ``kv_segment_ids`` and slots). ``pallas`` and ``splash`` serve only them: asked for with
    another layout (decoding with a cache), they give way to what ``auto`` picks there.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"expected one of {IMPLEMENTATIONS}")
    tq, tk, dh = q.shape[1], k.shape[1], q.shape[-1]
    if implementation == "auto":
        plat = backend.platform(platform_name)
        tiled = packed and tq % KERNEL_BLOCK == 0
        if plat == "gpu":
            if (q.dtype in (jnp.bfloat16, jnp.float16) and dh % 8 == 0
                    and dh <= _cudnn_head_dim_max()
                    and (tq == 1 or (tq % 2 == 0 and tk % 2 == 0))):
                return "cudnn"
            return "pallas" if tiled else "reference"
        if plat == "tpu":
            return "splash" if tiled else "reference"
        return "reference"
    if implementation in ("pallas", "splash") and not packed:
        return resolve("auto", q, k, packed=False, platform_name=platform_name)
    return implementation


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
           kv_segment_ids: jax.Array | None = None, q_slots: jax.Array | None = None,
           kv_slots: jax.Array | None = None, implementation: str = "auto") -> jax.Array:
    """Causal segment-local softmax attention: q (B,Tq,H,Dh), k/v (B,Tk,H,Dh) -> (B,Tq,H,Dh)
    in v's dtype, scale 1/sqrt(Dh).

    Query i of row b sees key j iff ``kv_slots[b,j] <= q_slots[b,i]`` and
    ``kv_segment_ids[b,j] == segment_ids[b,i]`` (``attention_mask``). Defaults: the keys'
    segment ids are ``segment_ids`` and the slots are ``0..T-1``: a packed row attending to
    itself. Decoding with a cache passes the query's slot and segment and the cache's.
    Every query must see at least one key (itself).

    Segment id 0 marks padding and is a segment like any other: a padding query attends to
    the earlier padding of its row, so its output is finite. Every implementation computes this
    same mask, so they agree on padding rows too (up to rounding); callers give padding zero
    loss weight.

    ``implementation`` (``IMPLEMENTATIONS``; ``resolve`` documents ``auto``):

    - ``reference``: ``dot_product_attention``, float32 logits and softmax over a materialised
      (B,H,Tq,Tk) array; the test oracle.
    - ``xla``: ``jax.nn.dot_product_attention(implementation="xla")`` with the boolean mask.
    - ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (bfloat16/float16
      only): the mask goes in as a (B,1,Tq,Tk) additive bias (no head axis, compute dtype),
      plus cuDNN's causal mask for packed rows so that blocks above the diagonal are skipped.
    - ``pallas``: the Pallas GPU flash attention (``jax.experimental.pallas.ops.gpu.attention``,
      its segment ids and causal flag; interpret mode off GPU).
    - ``splash``: the Pallas TPU splash attention with a causal mask and ``SegmentIds``, over
      ``KERNEL_BLOCK`` tiles (interpret mode off TPU).

    The kernels differentiate through the custom VJPs jax ships with them.
    """
    packed = kv_segment_ids is None and q_slots is None and kv_slots is None
    impl = resolve(implementation, q, k, packed=packed)
    if impl == "reference":
        mask = _visible(q, k, segment_ids, kv_segment_ids, q_slots, kv_slots)
        return dot_product_attention(q, k, v, mask)
    if impl in ("xla", "cudnn"):
        mask = _visible(q, k, segment_ids, kv_segment_ids, q_slots, kv_slots)[:, None]
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                         is_causal=impl == "cudnn" and packed)
        return o.astype(v.dtype)
    scale = 1.0 / float(np.sqrt(q.shape[-1]))
    if impl == "pallas":
        from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

        o = pallas_gpu.mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=scale, causal=True,
                           interpret=backend.platform() != "gpu")
        return o.astype(v.dtype)
    return _splash(q * jnp.asarray(scale, q.dtype), k, v, segment_ids.astype(jnp.int32))


@functools.cache
def _splash_kernel(heads: int, length: int, interpret: bool):
    """A causal splash-attention kernel over (heads, length, Dh) with ``KERNEL_BLOCK`` tiles."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b = KERNEL_BLOCK
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                               block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                               block_kv_dq=b)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    # Built outside any trace: the cached kernel's mask arrays must be constants, not tracers
    # of the jitted function that first asked for it.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Splash attention of scaled queries, vmapped over rows: (B,T,H,Dh) -> (B,T,H,Dh)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    kernel = _splash_kernel(q.shape[2], q.shape[1], backend.platform() != "tpu")

    def row(q, k, v, seg):  # (T,H,Dh) -> the kernel's (H,T,Dh)
        o = kernel(*(jnp.swapaxes(a, 0, 1) for a in (q, k, v)),
                   segment_ids=splash.SegmentIds(q=seg, kv=seg))
        return jnp.swapaxes(o, 0, 1)

    return jax.vmap(row)(q, k, v, segment_ids).astype(v.dtype)
