"""Greedy generation for DynTRM with a fixed-size KV cache, prefill + ``lax.while_loop`` decode.

Why the cache has a step axis: the shared block is applied ``S = max_refinement_steps`` times, and
at step ``s`` a token attends to the step-``s`` keys and values of every earlier token (those are
computed from the step-``s`` hidden states). So the cache keeps one K and one V per refinement
step, each ``(S, B, H, T_max, Dh)``; K is stored after RoPE (positions never change once written;
with ``rope="rope2d"`` each new token's grid coordinates come from ``nn.positions.GridCursor``).

Batch layout: prompts are **left-padded** (right-aligned) to a common length ``Tp``. Every row then
writes its n-th new token into the same slot ``Tp + n - 1``, so a single ``dynamic_update_slice``
updates the whole batch. A row with ``pad = Tp - length`` padding slots gets RoPE position
``slot - pad`` (its first real token is position 0, as in training) and attends only to slots
``>= pad``. In the prefill, padding slots form their own segment (id 0) so they never leak into a
real token; their keys stay in the cache but are masked for every later query.

Adaptive depth: a row-level halting decision pooled over the whole sequence does not decompose
per token, so each row's depth d_b is decided once, from its prompt, in the prefill: after every
refinement step the rule of ``model.halting`` (``families/dyntrm/halting.py``) reads the prompt
tokens' readout, and a row that has stopped keeps its hidden state frozen for the later steps.
Every decoded token of that row then uses the same depth (its x is frozen after step d_b). The
later steps' keys and values are still computed, from the frozen state, so the cache stays
complete, and the result equals a full-sequence ``transformer.forward_adaptive`` with
``depth=d``; with ``model.halting="none"`` (or a head that never halts) it is exactly
``transformer.forward``.

Decoding stops per row at ``<im_end>`` or ``<eos>`` (with ``stop_hopeless`` also once the answer
can no longer decode to a grid, ``eval.grammar``) and for the batch when every row has
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
from tinyonn_jax.eval.grammar import AnswerState
from tinyonn_jax.families.dyntrm import dense, dynmoe, dynsiha, halting, latent_heads, modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.nn import attention
from tinyonn_jax.nn.norm import layer_norm
from tinyonn_jax.nn.positions import GridCursor, grid_coordinates, rotary_positions

# The original's budget formula (pixels + rows + 2) at the largest grid, 30x30; it covers the
# largest legal answer (``tokenizer.max_answer_tokens()`` = 930) with room for a trailing eos.
DEFAULT_MAX_NEW_TOKENS = 30 * 30 + 30 + 2
STOP_TOKENS = (IM_END, EOS)


class KVCache(NamedTuple):
    """Keys (after RoPE) and values of every refinement step. Each (S, B, H, T_max, Dh); with
    ``attn_layout="latent_heads"`` one per latent head, (S, B, P, T_max, Dh)."""

    k: jax.Array
    v: jax.Array


class Generation(NamedTuple):
    """Result of ``generate``.

    ``tokens`` (B, N) int32: generated tokens, the stop token included, PAD after it.
    ``num_generated`` (B,) int32: tokens generated per row, the stop token included.
    ``mean_logprob`` (B,) float32: mean log-probability of those tokens under the model.
    ``steps`` (B,) int32: refinement steps each row used (its depth, decided from the prompt);
    None for a model without adaptive depth (``eval.recompute``).
    """

    tokens: jax.Array
    num_generated: jax.Array
    mean_logprob: jax.Array
    steps: jax.Array | None = None


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
                cfg: ModelConfig, live: dict | None = None) -> tuple[jax.Array, object]:
    """One refinement step of the shared block for the tokens in x (B, Tq, D), any
    ``attn_kind`` / ``ffn_kind``.

    Same computation as ``recursion.block_step`` without probes or residuals, except that the
    keys/values attended to come from ``attend(k, v) -> (k_all, v_all, layout, extra)``
    (``layout``: the mask arguments of ``attention.attend``): the
    prompt's own keys in the prefill, the cache in the decode. ``live`` {pool: (P,) bool} (an
    expert pool's live masks, ``lifecycle``) leaves dead experts out of routing. Returns
    (x, extra).
    """
    dt = x.dtype
    live = live or {}
    xn = layer_norm(block["ln1"], x, cfg.ln_eps)
    z_heads = None  # routing weights (B,Tq,P) of the latent heads; their keys need no routing
    if cfg.attn_kind == "mha":
        q, k, v = dense.mha_qkv(block["attn"], xn, cfg)
    elif cfg.latent_heads:  # P latent heads take the place of the H physical heads
        z_heads = latent_heads.route_heads(block["attn"], xn, cfg, live.get("attn")).z
        q, k, v = latent_heads.head_qkv(block["attn"], xn)
    else:
        u = attention.split_heads(xn, cfg.num_heads)
        routes = dynsiha.route_attention(block["attn"], u, cfg, live.get("attn"))
        qkv = dynsiha.compose_qkv(block["attn"], u, {c: r.z for c, r in routes.items()}, None,
                                    cfg.attn_dispatch, cfg.attn_capacity)
        q, k, v = qkv["q"], qkv["k"], qkv["v"]
    if cfg.rope != "none":
        q = attention.rope(q, positions, cfg.rope_base)
        k = attention.rope(k, positions, cfg.rope_base)
    k_all, v_all, layout, extra = attend(k, v)
    o = attention.attend(q, k_all, v_all, **layout, implementation=cfg.attention)
    if z_heads is not None:
        x = x + latent_heads.combine_heads(block["attn"], z_heads, o).astype(dt)
    else:
        x = x + (o.reshape(*o.shape[:2], -1) @ block["attn"]["o_proj"].astype(o.dtype)).astype(dt)
    if cfg.use_ffn:
        uf = layer_norm(block["ln2"], x, cfg.ln_eps)
        if cfg.ffn_kind == "swiglu":
            x = x + dense.swiglu(block["ffn"], uf).astype(dt)
        else:
            rf = dynmoe.route_ffn(block["ffn"], uf, cfg, live.get("ffn"))
            x = x + dynmoe.ffn_core(block["ffn"], uf, rf.z, None, cfg.ffn_dispatch,
                                    cfg.capacity_frac).astype(dt)
    return x, extra


def prefill(params: dict, tokens: jax.Array, lengths: jax.Array, cfg: ModelConfig,
            cache_len: int, live: dict | None = None) -> tuple[jax.Array, KVCache, jax.Array]:
    """Run left-padded prompts (B, Tp) through the refinement steps in one call.

    After every step the halting rule of ``cfg.halting`` reads the readout of each row's prompt
    tokens; a row that has stopped keeps its hidden state for the later steps (whose keys and
    values are computed from that frozen state). Returns the logits of each row's last prompt
    token (B, V) float32, a KV cache with ``cache_len >= Tp`` slots whose first Tp slots hold
    the prompt, and each row's depth (B,) int32 in [1, max_refinement_steps].
    """
    b, tp = tokens.shape
    pad = tp - lengths  # (B,)
    slots = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (b, tp))
    segment = (slots >= pad[:, None]).astype(jnp.int32)  # 0 = padding, 1 = prompt
    positions = rotary_positions(cfg.rope, tokens, jnp.maximum(slots - pad[:, None], 0), segment)
    layout = {"segment_ids": segment}  # packed rows: padding and prompt segments

    def attend_self(k, v):
        return k, v, layout, (k, v)

    readout = tr.make_readout(cfg)
    prompt = segment.astype(jnp.float32)  # the tokens the halting rule reads

    def body(carry, _):
        x, halted, depth = carry
        x_new, (k, v) = _block_step(params["block"], x, positions, attend_self, cfg, live)
        h, step_logits = readout(params, x_new)
        stop = halting.should_stop(params, h, step_logits, prompt, cfg)
        x = jnp.where(halted[:, None, None], x, x_new)
        depth = depth + (~halted).astype(jnp.int32)
        return (x, halted | stop, depth), (k, v)

    init = (tr.embed(params, tokens, cfg), jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    (x, _, depth), (ks, vs) = jax.lax.scan(body, init, None, length=cfg.max_refinement_steps)
    _, logits = readout(params, x[:, -1:])
    room = ((0, 0), (0, 0), (0, 0), (0, cache_len - tp), (0, 0))
    # (S, B, Tp, H, Dh) -> (S, B, H, T_max, Dh): head-major so each head reads contiguous keys.
    cache = KVCache(*(jnp.pad(jnp.swapaxes(a, 2, 3), room) for a in (ks, vs)))
    return logits[:, 0], cache, depth


def decode_step(params: dict, token: jax.Array, slot: jax.Array, pad: jax.Array,
                cache: KVCache, cfg: ModelConfig, depth: jax.Array | None = None,
                live: dict | None = None,
                coords: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Feed one token per row (B,) at cache slot ``slot`` (scalar); returns logits (B, V), cache.

    ``pad`` (B,) is each row's number of left-padding slots: keys in ``[pad, slot]`` are visible.
    The token's RoPE position is ``slot - pad``; with ``rope="rope2d"`` pass its grid
    coordinates ``coords`` (B, 3) (``nn.positions.GridCursor``).
    The cache is updated in place at ``[s, :, :, slot]`` for every refinement step s. With
    ``depth`` (B,) (from ``prefill``) a row's hidden state is frozen after ``depth[b]`` steps;
    the later steps still write keys and values, computed from the frozen state.
    """
    b = token.shape[0]
    t_max = cache.k.shape[3]
    positions = (slot - pad)[:, None] if coords is None else coords[:, None]  # (B, 1[, 3])
    key_slots = jnp.arange(t_max, dtype=jnp.int32)
    # The query (segment 1) sees the cache slots in [pad, slot].
    layout = {"segment_ids": jnp.ones((b, 1), jnp.int32),
              "kv_segment_ids": (key_slots >= pad[:, None]).astype(jnp.int32),
              "q_slots": jnp.broadcast_to(slot, (b, 1)),
              "kv_slots": jnp.broadcast_to(key_slots, (b, t_max))}

    def body(carry, s):
        x, kc, vc = carry

        def attend_cache(k, v):
            # k, v (B,1,H,Dh) -> (1,B,H,1,Dh) written at step s, slot `slot`.
            start = (s, 0, 0, slot, 0)
            kc2 = jax.lax.dynamic_update_slice(kc, jnp.swapaxes(k, 1, 2)[None], start)
            vc2 = jax.lax.dynamic_update_slice(vc, jnp.swapaxes(v, 1, 2)[None], start)
            k_s = jnp.swapaxes(jax.lax.dynamic_index_in_dim(kc2, s, 0, keepdims=False), 1, 2)
            v_s = jnp.swapaxes(jax.lax.dynamic_index_in_dim(vc2, s, 0, keepdims=False), 1, 2)
            return k_s, v_s, layout, (kc2, vc2)

        x_new, (kc, vc) = _block_step(params["block"], x, positions, attend_cache, cfg, live)
        if depth is not None:
            x_new = jnp.where((s < depth)[:, None, None], x_new, x)
        return (x_new, kc, vc), None

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


def greedy_loop(logits: jax.Array, state, step: Callable, max_new_tokens: int,
                stop_hopeless: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy decoding with a ``lax.while_loop``, shared by every generator.

    ``logits`` (B, V) predict the first new token; ``step(state, prev, i) -> (logits, state)``
    feeds ``prev`` (B,), the token generated at index ``i - 1``, and predicts token ``i``. A row
    stops at a stop token (emitting PAD after it), with ``stop_hopeless`` also as soon as its
    answer can no longer decode to a grid (``grammar.AnswerState``; such a row ends without a
    stop token, which scores exactly as the malformed answer it would have become); the batch
    stops when every row has stopped or after ``max_new_tokens``. Returns tokens
    (B, max_new_tokens) int32, the number generated (B,), the stop token included, and their
    mean log-probability (B,).
    """
    b = logits.shape[0]
    tok, logp = _pick(logits)
    answer, hopeless = AnswerState.start(b).advance(tok)
    done = _is_stop(tok) | (hopeless & stop_hopeless)
    out = jnp.full((b, max_new_tokens), PAD, jnp.int32).at[:, 0].set(tok)
    init = (jnp.int32(1), out, jnp.ones((b,), jnp.int32), logp, done, answer, state)

    def cond(c):
        i, *_, done, _, _ = c
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(c):
        i, out, n, logp_sum, done, answer, state = c
        prev = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1, keepdims=False)
        logits, state = step(state, prev, i)
        tok, logp = _pick(logits)
        tok = jnp.where(done, PAD, tok)  # finished rows keep computing (static shapes), emit PAD
        out = jax.lax.dynamic_update_index_in_dim(out, tok, i, axis=1)
        n = n + (~done).astype(jnp.int32)
        logp_sum = logp_sum + jnp.where(done, 0.0, logp)
        answer, hopeless = answer.advance(tok)
        stop = _is_stop(tok) | (hopeless & stop_hopeless)
        return i + 1, out, n, logp_sum, done | stop, answer, state

    _, out, n, logp_sum, *_ = jax.lax.while_loop(cond, body, init)
    return out, n, logp_sum / n


def generate(params: dict, tokens: jax.Array, lengths: jax.Array, cfg: ModelConfig, *,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             live: dict | None = None, stop_hopeless: bool = False) -> Generation:
    """Greedy decoding of left-padded prompts tokens (B, Tp) with true lengths (B,).

    ``live`` {pool: (P,) bool}: the live masks of a model with an expert pool (the
    ``TrainState.extras.live`` of a DynTRM run with a lifecycle); None: every expert is live.
    ``stop_hopeless``: a row also stops once its answer can no longer be a grid
    (``greedy_loop``).

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
    return _generate(params, tokens, lengths, cfg, live, max_new_tokens=max_new_tokens,
                     stop_hopeless=stop_hopeless)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "stop_hopeless"))
def _generate(params: dict, tokens: jax.Array, lengths: jax.Array, cfg: ModelConfig,
              live: dict | None, *, max_new_tokens: int, stop_hopeless: bool) -> Generation:
    """The jitted body of ``generate`` (arguments already checked)."""
    tp = tokens.shape[1]
    lengths = lengths.astype(jnp.int32)
    pad = tp - lengths
    # The last generated token is never fed back, hence - 1.
    logits, cache, depth = prefill(params, tokens, lengths, cfg, tp + max_new_tokens - 1,
                                   live)
    cursor = None
    if cfg.rope == "rope2d":  # grid coordinates continue from the prompt's last token
        segment = (jnp.arange(tp) >= pad[:, None]).astype(jnp.int32)
        last = grid_coordinates(tokens, segment)[:, -1]
        cursor = GridCursor.after(tokens[:, -1].astype(jnp.int32), last)

    def step(state, prev, i):
        cache, cursor = state
        coords = None
        if cursor is not None:
            coords, cursor = cursor.step(prev)
        logits, cache = decode_step(params, prev, tp + i - 1, pad, cache, cfg, depth, live,
                                    coords)
        return logits, (cache, cursor)

    out, n, mean_logprob = greedy_loop(logits, (cache, cursor), step, max_new_tokens,
                                       stop_hopeless)
    return Generation(tokens=out, num_generated=n, mean_logprob=mean_logprob, steps=depth)
