"""Dense baselines inside the same DynTRM recursion: multi-head attention and a SwiGLU FFN.

``ModelConfig.attn_kind="mha"`` replaces DynSIHA+ by standard multi-head attention (q, k, v and
o projections, each (D, D)) with the same RoPE and causal segment-local mask as
``dynsiha``; ``ModelConfig.ffn_kind="swiglu"`` replaces DynMoE by one dense SwiGLU FFN
``(silu(u W_gate) * (u W_up)) W_down`` of width ``ModelConfig.swiglu_width``. Everything else
(embedding, pre-norm residual block, ``lax.scan`` over refinement steps, ACT head, readout) is
shared, so a comparison isolates routing. A dense sublayer has no expert call site: its expert
input and site residuals stay None in the block's ``residuals.StepResiduals`` and it takes no
probe.

Every dense weight is a ``MainParam`` (``modules.DenseAttention``, ``modules.SwiGlu``).
``match_param_count`` picks the dense twin's widths so that its parameter count is within 5% of a
routed model's.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm.config import ModelConfig
from tinyonn_jax.nn import attention
from tinyonn_jax.nn.norm import layer_norm


def mha_qkv(params: dict, xn: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, ...]:
    """Projections of the normalised input xn (B,T,D) -> q, k, v, each (B,T,H,Dh), before RoPE."""
    return tuple(attention.split_heads(xn @ params[w].astype(xn.dtype), cfg.num_heads)
                 for w in ("wq", "wk", "wv"))


def mha_core(params: dict, xn: jax.Array, positions: jax.Array, segment_ids: jax.Array,
             cfg: ModelConfig) -> jax.Array:
    """Causal segment-local multi-head attention: xn (B,T,D), positions/segment_ids (B,T)."""
    q, k, v = mha_qkv(params, xn, cfg)
    if cfg.rope != "none":
        q, k = attention.rope(q, positions, cfg.rope_base), attention.rope(k, positions,
                                                                          cfg.rope_base)
    o = attention.attend(q, k, v, segment_ids, implementation=cfg.attention)
    return o.reshape(*o.shape[:2], -1) @ params["o_proj"].astype(o.dtype)


def swiglu(params: dict, u: jax.Array) -> jax.Array:
    """``(silu(u W_gate) * (u W_up)) W_down``: u (..., D) -> (..., D)."""
    dt = u.dtype
    h = jax.nn.silu(u @ params["w_gate"].astype(dt)) * (u @ params["w_up"].astype(dt))
    return h @ params["w_down"].astype(dt)


def mha_sublayer(block: dict, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cfg: ModelConfig) -> jax.Array:
    """``x + MHA(LN1 x)``: x (B,T,D). Rematerialisation is applied to the whole refinement step
    (``recursion.remat_body``)."""
    xn = layer_norm(block["ln1"], x, cfg.ln_eps)
    return x + mha_core(block["attn"], xn, positions, segment_ids, cfg).astype(x.dtype)


def swiglu_sublayer(block: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """``x + SwiGLU(LN2 x)``: x (B,T,D)."""
    u = layer_norm(block["ln2"], x, cfg.ln_eps)
    return x + swiglu(block["ffn"], u).astype(x.dtype)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of ``modules.init_params(cfg)``, from shapes only (nothing allocated)."""
    shapes = jax.eval_shape(lambda k: modules.init_params(k, cfg), jax.random.key(0))
    return int(sum(math.prod(a.shape) for a in jax.tree.leaves(shapes)))


def _hidden_candidates(cfg: ModelConfig) -> list[int]:
    """Hidden widths keeping ``num_heads`` with an (even, for RoPE) integer head width."""
    step = cfg.num_heads * (2 if cfg.rope != "none" else 1)
    return list(range(step, 4 * cfg.hidden + 1, step))


def match_param_count(routed_cfg: ModelConfig, *, attn_kind: str = "mha",
                      ffn_kind: str = "swiglu", tol: float = 0.05) -> ModelConfig:
    """The dense twin of ``routed_cfg`` whose parameter count is within ``tol`` of it.

    The twin keeps hidden width, heads, steps and every other setting. With a SwiGLU FFN only its
    width moves (the count is affine in it, so it is solved exactly); without one (attention-only
    models, or a routed FFN kept) the hidden width is searched instead (the count grows with it).
    Raises ``ValueError`` when no setting comes within ``tol``.
    """
    target = param_count(routed_cfg)
    twin = dataclasses.replace(routed_cfg, attn_kind=attn_kind, ffn_kind=ffn_kind,
                               swiglu_hidden=1)
    if twin.use_ffn and ffn_kind == "swiglu":
        base = param_count(twin)  # width 1; each further unit adds 3 * hidden parameters
        width = round((target - base) / (3 * twin.hidden)) + 1
        if width >= 1:
            twin = dataclasses.replace(twin, swiglu_hidden=width)
    if abs(param_count(twin) / target - 1.0) > tol:
        twin = _search_hidden(twin, target)
    got = param_count(twin)
    if abs(got / target - 1.0) > tol:
        raise ValueError(f"no dense twin within {tol:.0%} of {target} parameters "
                         f"(closest: {got} with hidden={twin.hidden})")
    return twin


def _search_hidden(twin: ModelConfig, target: int) -> ModelConfig:
    """Bisection over hidden widths for the count closest to ``target`` (monotone in hidden)."""
    cands = _hidden_candidates(twin)
    cfg_of = lambda h: dataclasses.replace(twin, hidden=h)  # noqa: E731
    lo, hi = 0, len(cands) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if param_count(cfg_of(cands[mid])) < target:
            lo = mid + 1
        else:
            hi = mid
    near = {cands[i] for i in (lo - 1, lo) if 0 <= i < len(cands)}
    return min((cfg_of(h) for h in near), key=lambda c: abs(param_count(c) - target))
