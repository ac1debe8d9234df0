"""Greedy generation for DynTRM with a fixed-size KV cache, prefill + ``lax.while_loop`` decode.

Why the cache has a step axis: the shared block is applied ``S = max_refinement_steps`` times, and
at step ``s`` a token attends to the step-``s`` keys and values of every earlier token (those are
computed from the step-``s`` hidden states). So the cache keeps one K and one V per refinement
step, each ``(S, B, H, T_max, Dh)``; K is stored after RoPE (positions never change once written).

Batch layout: prompts are **left-padded** (right-aligned) to a common length ``Tp``. Every row then
writes its n-th new token into the same slot ``Tp + n - 1``, so a single ``dynamic_update_slice``
updates the whole batch. A row with ``pad = Tp - length`` padding slots gets RoPE position
``slot - pad`` (its first real token is position 0, as in training) and attends only to slots
``>= pad``. In the prefill, padding slots form their own segment (id 0) so they never leak into a
real token; their keys stay in the cache but are masked for every later query.

Generation runs every refinement step for every token, exactly like ``transformer.forward`` (no
ACT early exit: a row-level halting decision pooled over the whole sequence does not decompose
per token). It stops per row at ``<im_end>`` or ``<eos>`` and for the batch when every row has
stopped or after ``max_new_tokens``, a budget that is a constant and never depends on the answer
(the original sized it from the true answer and so leaked it, reference.md section 7).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tinyonn_jax import validate
from tinyonn_jax.data.tokenizer import EOS, IM_END, PAD
from tinyonn_jax.families.dyntrm import dense, dynmoe, dynsiha, modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.nn import attention
from tinyonn_jax.nn.norm import layer_norm

# The original's budget formula (pixels + rows + 2) at the largest grid, 30x30; it covers the
# largest legal answer (``tokenizer.max_answer_tokens()`` = 930) with room for a trailing eos.
DEFAULT_MAX_NEW_TOKENS = 30 * 30 + 30 + 2
STOP_TOKENS = (IM_END, EOS)


class KVCache(NamedTuple):
    """Keys (after RoPE) and values of every refinement step. Each (S, B, H, T_max, Dh)."""

    k: jax.Array
    v: jax.Array


class Generation(NamedTuple):
    """Result of ``generate``.

    ``tokens`` (B, N) int32: generated tokens, the stop token included, PAD after it.
    ``num_generated`` (B,) int32: tokens generated per row, the stop token included.
    ``mean_logprob`` (B,) float32: mean log-probability of those tokens under the model.
    """

    tokens: jax.Array
    num_generated: jax.Array
    mean_logprob: jax.Array


def left_pad(prompts: Sequence[np.ndarray], length: int | None = None) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Right-align prompts in a PAD-filled (B, length) int32 array; returns (tokens, lengths).

    ``length`` defaults to the longest prompt. Raises ``ValueError`` for an empty prompt or one
    longer than ``length``.
    """
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.size == 0:
        raise ValueError("left_pad needs at least one prompt")
    if (lengths == 0).any():
        raise ValueError(f"prompt {int(np.argmin(lengths))} is empty")
    t = int(lengths.max()) if length is None else int(length)
    if lengths.max() > t:
        raise ValueError(f"prompt of {int(lengths.max())} tokens does not fit length {t}")
    tokens = np.full((len(prompts), t), PAD, np.int32)
    for i, p in enumerate(prompts):  # host-side packing, not traced
        tokens[i, t - len(p):] = np.asarray(p, np.int32)
    return tokens, lengths


def _block_step(block: dict, x: jax.Array, positions: jax.Array, attend: Callable,
                cfg: ModelConfig) -> tuple[jax.Array, object]:
    """One refinement step of the shared block for the tokens in x (B, Tq, D), any
    ``attn_kind`` / ``ffn_kind``.

    Same computation as ``recursion.block_step`` without probes or residuals, except that the
    keys/values attended to come from ``attend(k, v) -> (k_all, v_all, mask, extra)``: the
    prompt's own keys in the prefill, the cache in the decode. Returns (x, extra).
    """
    dt = x.dtype
    xn = layer_norm(block["ln1"], x, cfg.ln_eps)
    if cfg.attn_kind == "mha":
        q, k, v = dense.mha_qkv(block["attn"], xn, cfg)
    else:
        u = attention.split_heads(xn, cfg.num_heads)
        routes = dynsiha.route_attention(block["attn"], u, cfg)
        qkv = dynsiha.compose_qkv(block["attn"], u, {c: r.z for c, r in routes.items()}, None,
                                    cfg.attn_dispatch, cfg.attn_capacity)
        q, k, v = qkv["q"], qkv["k"], qkv["v"]
    if cfg.rope == "rope1d":
        q = attention.rope(q, positions, cfg.rope_base)
        k = attention.rope(k, positions, cfg.rope_base)
    k_all, v_all, mask, extra = attend(k, v)
    o = attention.dot_product_attention(q, k_all, v_all, mask)
    x = x + (o.reshape(*o.shape[:2], -1) @ block["attn"]["o_proj"].astype(o.dtype)).astype(dt)
    if cfg.use_ffn:
        uf = layer_norm(block["ln2"], x, cfg.ln_eps)
        if cfg.ffn_kind == "swiglu":
            x = x + dense.swiglu(block["ffn"], uf).astype(dt)
        else:
            rf = dynmoe.route_ffn(block["ffn"], uf, cfg)
            x = x + dynmoe.ffn_core(block["ffn"], uf, rf.z, None, cfg.ffn_dispatch,
                                    cfg.capacity_frac).astype(dt)
    return x, extra


def prefill(params: dict, tokens: jax.Array, lengths: jax.Array, cfg: ModelConfig,
            cache_len: int) -> tuple[jax.Array, KVCache]:
    """Run left-padded prompts (B, Tp) through all refinement steps in one call.

    Returns the logits of each row's last prompt token (B, V) float32 and a KV cache with
    ``cache_len >= Tp`` slots whose first Tp slots hold the prompt.
    """
    b, tp = tokens.shape
    pad = tp - lengths  # (B,)
    slots = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (b, tp))
    segment = (slots >= pad[:, None]).astype(jnp.int32)  # 0 = padding, 1 = prompt
    positions = jnp.maximum(slots - pad[:, None], 0)
    mask = attention.attention_mask(slots, slots, segment, segment)

    def attend_self(k, v):
        return k, v, mask, (k, v)

    def body(x, _):
        x, (k, v) = _block_step(params["block"], x, positions, attend_self, cfg)
        return x, (k, v)

    x, (ks, vs) = jax.lax.scan(body, tr.embed(params, tokens, cfg), None,
                               length=cfg.max_refinement_steps)
    _, logits = tr.make_readout(cfg)(params, x[:, -1:])
    room = ((0, 0), (0, 0), (0, 0), (0, cache_len - tp), (0, 0))
    # (S, B, Tp, H, Dh) -> (S, B, H, T_max, Dh): head-major so each head reads contiguous keys.
    cache = KVCache(*(jnp.pad(jnp.swapaxes(a, 2, 3), room) for a in (ks, vs)))
    return logits[:, 0], cache


def decode_step(params: dict, token: jax.Array, slot: jax.Array, pad: jax.Array,
                cache: KVCache, cfg: ModelConfig) -> tuple[jax.Array, KVCache]:
    """Feed one token per row (B,) at cache slot ``slot`` (scalar); returns logits (B, V), cache.

    ``pad`` (B,) is each row's number of left-padding slots: keys in ``[pad, slot]`` are visible.
    The cache is updated in place at ``[s, :, :, slot]`` for every refinement step s.
    """
    b = token.shape[0]
    t_max = cache.k.shape[3]
    positions = (slot - pad)[:, None]  # (B, 1)
    key_slots = jnp.arange(t_max, dtype=jnp.int32)
    mask = ((key_slots >= pad[:, None]) & (key_slots <= slot))[:, None, :]  # (B, 1, T_max)

    def body(carry, s):
        x, kc, vc = carry

        def attend_cache(k, v):
            # k, v (B,1,H,Dh) -> (1,B,H,1,Dh) written at step s, slot `slot`.
            start = (s, 0, 0, slot, 0)
            kc2 = jax.lax.dynamic_update_slice(kc, jnp.swapaxes(k, 1, 2)[None], start)
            vc2 = jax.lax.dynamic_update_slice(vc, jnp.swapaxes(v, 1, 2)[None], start)
            k_s = jnp.swapaxes(jax.lax.dynamic_index_in_dim(kc2, s, 0, keepdims=False), 1, 2)
            v_s = jnp.swapaxes(jax.lax.dynamic_index_in_dim(vc2, s, 0, keepdims=False), 1, 2)
            return k_s, v_s, mask, (kc2, vc2)

        x, (kc, vc) = _block_step(params["block"], x, positions, attend_cache, cfg)
        return (x, kc, vc), None

    x0 = tr.embed(params, token.reshape(b, 1), cfg)
    steps = jnp.arange(cfg.max_refinement_steps)
    (x, kc, vc), _ = jax.lax.scan(body, (x0, cache.k, cache.v), steps)
    _, logits = tr.make_readout(cfg)(params, x)
    return logits[:, 0], KVCache(kc, vc)


def _pick(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy token (B,) and its log-probability (B,) from logits (B, V)."""
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


def _is_stop(tok: jax.Array) -> jax.Array:
    return functools.reduce(jnp.logical_or, [tok == s for s in STOP_TOKENS])


def generate(params: dict, tokens: jax.Array, lengths: jax.Array, cfg: ModelConfig, *,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Generation:
    """Greedy decoding of left-padded prompts tokens (B, Tp) with true lengths (B,).

    Compiles once per (B, Tp, cfg, max_new_tokens); see ``left_pad`` and the module docstring
    for the layout. Returns a ``Generation`` with tokens (B, max_new_tokens).

    Raises ``ValueError`` (``validate.check_generate_inputs``) for tokens that are not an integer
    (B, Tp) array of ids in ``[0, cfg.vocab_size)``, lengths that are not integers (B,) in
    ``[1, Tp]``, params of another model, or ``max_new_tokens < 1``. Value checks run on
    concrete arguments, before the jitted decoding.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    validate.check_generate_inputs(params, tokens, lengths, cfg, modules.param_layout(cfg))
    return _generate(params, tokens, lengths, cfg, max_new_tokens=max_new_tokens)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _generate(params: dict, tokens: jax.Array, lengths: jax.Array, cfg: ModelConfig, *,
              max_new_tokens: int) -> Generation:
    """The jitted body of ``generate`` (arguments already checked)."""
    b, tp = tokens.shape
    lengths = lengths.astype(jnp.int32)
    pad = tp - lengths
    # The last generated token is never fed back, hence - 1.
    logits, cache = prefill(params, tokens, lengths, cfg, tp + max_new_tokens - 1)
    tok, logp = _pick(logits)
    out = jnp.full((b, max_new_tokens), PAD, jnp.int32).at[:, 0].set(tok)
    init = (jnp.int32(1), out, jnp.ones((b,), jnp.int32), logp, _is_stop(tok), cache)

    def cond(c):
        i, *_, done, _ = c
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(c):
        i, out, n, logp_sum, done, cache = c
        prev = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1, keepdims=False)
        logits, cache = decode_step(params, prev, tp + i - 1, pad, cache, cfg)
        tok, logp = _pick(logits)
        tok = jnp.where(done, PAD, tok)  # finished rows keep computing (static shapes), emit PAD
        out = jax.lax.dynamic_update_index_in_dim(out, tok, i, axis=1)
        n = n + (~done).astype(jnp.int32)
        logp_sum = logp_sum + jnp.where(done, 0.0, logp)
        return i + 1, out, n, logp_sum, done | _is_stop(tok), cache

    _, out, n, logp_sum, _, _ = jax.lax.while_loop(cond, body, init)
    return Generation(tokens=out, num_generated=n, mean_logprob=logp_sum / n)
