"""Import and export state dicts of the original PyTorch DynTRM (attention-only DynSIHA+).

The original ``ArcTransformer`` (``exp/arc_dyntrm/model.py``, see ``reference.md`` section 1) has
these parameters (P latent experts, D hidden, H heads, Dh = D/H, V vocabulary)::

    embedding.color_embedding.weight          (V, D)
    attn_expert_library.{i}.w1.weight         (Dh, Dh)   i < P, torch Linear layout (out, in)
    attn_expert_library.{i}.w2.weight         (Dh, Dh)
    block.ln1.weight, block.ln1.bias          (D,)
    block.attn.proto_q|proto_k|proto_v        (P, Dh)
    block.attn.gate_q|gate_k|gate_v           (P,)
    block.attn.o_proj.weight                  (D, D)     (out, in), no bias
    lm_head.weight                            (V, D)     (out, in), no bias

Our layout multiplies from the right (``x @ W``), so every Linear weight is transposed and the
per-expert modules are stacked on a leading P axis: ``library.w1 (P, Dh, Dh) = w1.weight^T``.
H and the number of refinement steps are not stored in a state dict and must be given.

Differences that remain, by construction:
  * our model has an ACT halting head the original lacks. It is initialised with zero weights and
    a q_halt bias of -5 (p_halt = sigmoid(-5) ~ 0.007 for every input), and the returned config
    sets ``halt_threshold=1.0``, which a sigmoid never exceeds: ``forward_adaptive`` always runs
    all steps, like the original. ``forward`` never reads the head. Export drops it.
  * the original treats an expert as active when ``relu(score) > 1e-6``, ours when ``score > 0``;
    the two differ only by contributions below 1e-6 times an expert output.

A ``.safetensors`` file needs the optional ``safetensors`` package (``pip install safetensors``);
a dict of numpy arrays (or of CPU torch tensors, via ``np.asarray``) needs nothing extra. To get
a file from a PyTorch checkpoint: ``safetensors.torch.save_file(model.state_dict(), path)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tinyonn_jax.config import Config, ModelConfig, OptimizerConfig, SarsConfig
from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.nn import variables

EMBED = "embedding.color_embedding.weight"
LN_WEIGHT, LN_BIAS = "block.ln1.weight", "block.ln1.bias"
O_PROJ = "block.attn.o_proj.weight"
LM_HEAD = "lm_head.weight"
QKV = ("q", "k", "v")
REFERENCE_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which the original uses
_STATIC_KEYS = [EMBED, LN_WEIGHT, LN_BIAS, O_PROJ, LM_HEAD,
                *(f"block.attn.{n}_{c}" for n in ("proto", "gate") for c in ("q", "k", "v"))]
_LIB_RE = re.compile(r"^attn_expert_library\.(\d+)\.w[12]\.weight$")

StateDict = dict[str, np.ndarray]


def library_key(i: int, w: str) -> str:
    """Key of expert ``i``'s ``w`` ('w1' or 'w2') weight in the original state dict."""
    return f"attn_expert_library.{i}.{w}.weight"


def expected_shapes(*, vocab_size: int, hidden: int, num_heads: int,
                    num_experts: int) -> dict[str, tuple[int, ...]]:
    """Every key of the original DynTRM state dict with its shape."""
    dh = hidden // num_heads
    shapes: dict[str, tuple[int, ...]] = {EMBED: (vocab_size, hidden)}
    for i in range(num_experts):
        shapes[library_key(i, "w1")] = (dh, dh)
        shapes[library_key(i, "w2")] = (dh, dh)
    shapes[LN_WEIGHT] = shapes[LN_BIAS] = (hidden,)
    for c in QKV:
        shapes[f"block.attn.proto_{c}"] = (num_experts, dh)
        shapes[f"block.attn.gate_{c}"] = (num_experts,)
    shapes[O_PROJ] = (hidden, hidden)
    shapes[LM_HEAD] = (vocab_size, hidden)
    return shapes


def _first_dim(shapes: Mapping[str, tuple[int, ...]], sources: tuple[tuple[str, int, int], ...]):
    """The first available ``shape[axis]`` among (key, ndim, axis) sources, else None."""
    for key, ndim, axis in sources:
        s = shapes.get(key)
        if s is not None and len(s) == ndim:
            return s[axis]
    return None


def _infer_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int | None]:
    """V, D and P from whichever keys are present (so one bad key cannot hide the others)."""
    vocab = _first_dim(shapes, ((EMBED, 2, 0), (LM_HEAD, 2, 0)))
    hidden = _first_dim(shapes, ((EMBED, 2, 1), (LM_HEAD, 2, 1), (LN_WEIGHT, 1, 0),
                                 (LN_BIAS, 1, 0), (O_PROJ, 2, 0)))
    experts = _first_dim(shapes, tuple((f"block.attn.{n}_{c}", nd, 0) for n, nd in
                                       (("proto", 2), ("gate", 1)) for c in QKV))
    if experts is None:  # fall back on the library's indices
        idx = [int(m.group(1)) for k in shapes if (m := _LIB_RE.match(k))]
        experts = max(idx) + 1 if idx else None
    return {"V": vocab, "D": hidden, "P": experts}


def _prefix_hint(missing: list[str], extra: list[str]) -> str:
    """Suggest stripping a wrapper prefix ('module.', '_orig_mod.') when that explains it."""
    prefixes = {k[: -len(m)] for k in extra for m in missing if k.endswith("." + m)}
    if len(prefixes) == 1:
        p = prefixes.pop()
        return (f"\n  hint: the keys seem to carry the prefix {p!r}; strip it first, e.g. "
                f"{{k.removeprefix({p!r}): v for k, v in sd.items()}}")
    return ""


def _as_float_arrays(sd: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
    arrays, bad = {}, []
    for k, v in sd.items():
        try:
            a = np.asarray(v)
        except Exception as e:  # noqa: BLE001 - anything that is not array-like is reported
            bad.append(f"{k}: not an array ({type(v).__name__}: {e})")
            continue
        if not (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
            bad.append(f"{k}: dtype {a.dtype} is not floating point")
            continue
        arrays[str(k)] = a
    return arrays, bad


def check_state_dict(sd: Mapping[str, Any], *, num_heads: int) -> dict[str, int]:
    """Validate ``sd`` against the original layout; return {'V', 'D', 'P', 'Dh'}.

    Raises ONE ``ValueError`` listing every missing, unexpected, misshapen or non-float key.
    """
    arrays, problems = _as_float_arrays(sd)
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    dims = _infer_dims(shapes)
    undetermined = [n for n, v in dims.items() if v is None]
    heads_ok = isinstance(num_heads, int) and not isinstance(num_heads, bool) and num_heads > 0
    if not heads_ok:
        problems.append(f"num_heads={num_heads!r} must be a positive integer")
    elif dims["D"] is not None and dims["D"] % num_heads:
        problems.append(f"num_heads={num_heads} does not divide the hidden size D={dims['D']}")
        heads_ok = False
    expected = {}
    if heads_ok and not undetermined:
        expected = expected_shapes(vocab_size=dims["V"], hidden=dims["D"], num_heads=num_heads,
                                   num_experts=dims["P"])
    if undetermined:
        problems.append(f"cannot infer {', '.join(undetermined)} from the keys present")
    missing = sorted(set(expected) - set(sd)) if expected else []
    extra = sorted(set(sd) - set(expected)) if expected else []
    misshapen = [f"{k}: {shapes[k]}, expected {s}" for k, s in expected.items()
                 if k in shapes and shapes[k] != s]
    lines = [f"  {p}" for p in problems]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {missing}")
    if extra:
        lines.append(f"  unexpected keys ({len(extra)}): {extra}")
    if misshapen:
        lines.append(f"  misshapen ({len(misshapen)}): " + "; ".join(misshapen))
    if lines:
        known = ", ".join(f"{n}={v}" for n, v in dims.items() if v is not None)
        raise ValueError(f"state dict does not match the original DynTRM layout "
                         f"(inferred {known or 'nothing'}, H={num_heads}):\n"
                         + "\n".join(lines)
                         + _prefix_hint(missing or _STATIC_KEYS, extra or list(sd)))
    return {**dims, "Dh": dims["D"] // num_heads}


def reference_config(*, vocab_size: int, hidden: int, num_heads: int, num_experts: int,
                     steps: int) -> Config:
    """A ``Config`` whose model computes exactly what the original DynTRM computes.

    Model: the per-head q/k/v routers (``attn_layout="qkv_routers"``), no RoPE, no FFN, no final
    LayerNorm, LN eps 1e-5, CAPR routing with raw ReLU weights, latent heads Dh -> Dh -> Dh,
    ``halt_threshold=1.0`` (never exit early). Training sections: the original's optimisers
    (AdamW lr 1e-3, weight decay 0.01, element-wise clipping 1.0 of the computation gradients)
    and ``w_act=0`` (it had no ACT loss); SARS keeps our defaults (exact goodness, isolated
    groups). For the original's training signal, replace ``sars`` with
    ``SarsConfig(isolate=False, meta_loss='dyntrm_original', importance='output_grad', w_act=0)``.
    """
    model = ModelConfig(vocab_size=vocab_size, hidden=hidden, num_heads=num_heads,
                        attn_layout="qkv_routers", num_attn_experts=num_experts,
                        attn_expert_hidden=0, use_ffn=False,
                        max_refinement_steps=steps, attn_routing="capr", rope="none",
                        final_norm=False, ln_eps=REFERENCE_LN_EPS, halt_threshold=1.0,
                        compute_dtype="float32")
    adamw = (("weight_decay", 0.01),)
    return Config(model=model, sars=SarsConfig(w_act=0.0),
                  optim=OptimizerConfig(name="adamw", learning_rate=1e-3, kwargs=adamw,
                                        clip_value=1.0),
                  meta_optim=OptimizerConfig(name="adamw", learning_rate=1e-3, kwargs=adamw))


def import_state_dict(sd: Mapping[str, Any] | str | os.PathLike, *, num_heads: int,
                      steps: int) -> tuple[Config, dict]:
    """Original DynTRM state dict (mapping of arrays, or a ``.safetensors`` path) -> (cfg, params).

    D, P, V and Dh are inferred from the shapes; ``num_heads`` (H) and ``steps`` (refinement
    steps) are not stored in a state dict. ``params`` has exactly the structure, shapes and dtype
    (float32) of ``modules.init_params`` for ``cfg.model``, so ``forward``, the optimizers and
    a ``TrainState`` take it unchanged.
    """
    if isinstance(sd, (str, os.PathLike)):
        sd = load_safetensors(sd)
    if not isinstance(sd, Mapping):
        raise TypeError(f"expected a mapping of arrays or a .safetensors path, got {type(sd)}")
    dims = check_state_dict(sd, num_heads=num_heads)
    cfg = reference_config(vocab_size=dims["V"], hidden=dims["D"], num_heads=num_heads,
                           num_experts=dims["P"], steps=steps)
    f32 = {k: np.asarray(v).astype(np.float32) for k, v in sd.items()}
    p = dims["P"]
    attn = {
        # torch Linear computes u @ W^T; ours computes u @ W, hence the transposes.
        "library": {w: np.stack([f32[library_key(i, w)].T for i in range(p)])
                    for w in ("w1", "w2")},
        "o_proj": f32[O_PROJ].T,
    }
    for c in QKV:
        attn[f"proto_{c}"] = f32[f"block.attn.proto_{c}"]
        attn[f"gate_{c}"] = f32[f"block.attn.gate_{c}"]
    params = {
        "embed": f32[EMBED],
        "block": {"ln1": {"scale": f32[LN_WEIGHT], "bias": f32[LN_BIAS]}, "attn": attn},
        "lm_head": f32[LM_HEAD].T,
        "halt": variables.pure_params(modules.Halting(cfg.model)),  # a fresh head: TRM's start
    }
    return cfg, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _config_problems(m: ModelConfig) -> list[str]:
    """Why the original model could not represent ``m`` (empty list if it can)."""
    checks = [
        (isinstance(m, ModelConfig), f"a {type(m).__name__} model (the original is DynTRM)"),
        # getattr: older configs predate the dense baselines and are DynSIHA+ by construction.
        (getattr(m, "attn_kind", "dynsiha") == "dynsiha",
         f"model.attn_kind={getattr(m, 'attn_kind', None)!r} (the original uses DynSIHA+)"),
        # getattr: older configs predate the latent-head layout and are qkv routers.
        (getattr(m, "attn_layout", "qkv_routers") == "qkv_routers",
         f"model.attn_layout={getattr(m, 'attn_layout', None)!r} (the original routes q, k and v "
         "per head: 'qkv_routers')"),
        (not m.use_ffn, "model.use_ffn=True (the original block has no FFN experts)"),
        (not m.final_norm, "model.final_norm=True (the original has no final LayerNorm)"),
        (m.rope == "none", f"model.rope={m.rope!r} (the original has no positional encoding)"),
        (m.attn_routing == "capr",
         f"model.attn_routing={m.attn_routing!r} (the original routes with CAPR)"),
        (m.attn_mlp_hidden == m.head_dim,
         f"model.attn_expert_hidden={m.attn_expert_hidden} (the original's latent heads are "
         f"Dh -> Dh -> Dh with Dh={m.head_dim})"),
        (m.ln_eps == REFERENCE_LN_EPS,
         f"model.ln_eps={m.ln_eps} (the original's LayerNorm uses {REFERENCE_LN_EPS})"),
    ]
    return [why for ok, why in checks if not ok]


def _tree_problems(params: Any, cfg: ModelConfig) -> list[str]:
    want = jax.eval_shape(lambda k: modules.init_params(k, cfg), jax.random.key(0))
    flat_w = {jax.tree_util.keystr(p): tuple(s.shape)
              for p, s in jax.tree_util.tree_flatten_with_path(want)[0]}
    flat_g = {jax.tree_util.keystr(p): tuple(np.shape(a))
              for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    out = [f"params lacks {k}" for k in sorted(set(flat_w) - set(flat_g))]
    out += [f"params has unexpected {k}" for k in sorted(set(flat_g) - set(flat_w))]
    out += [f"params{k} has shape {flat_g[k]}, expected {s}" for k, s in flat_w.items()
            if k in flat_g and flat_g[k] != s]
    return out


def export_state_dict(params: dict, cfg: Config | ModelConfig) -> StateDict:
    """Our params -> the original DynTRM's state dict (float32 numpy arrays, torch layout).

    Refuses, with one ``ValueError`` listing every reason, a config the original cannot
    represent (FFN experts, final norm, RoPE, non-CAPR routing, other expert widths or LN eps) or
    params that do not match the config. The halting head has no counterpart and is dropped.
    """
    m = cfg.model if isinstance(cfg, Config) else cfg
    problems = _config_problems(m)
    if not problems:
        problems = _tree_problems(params, m)
    if problems:
        raise ValueError("cannot export to the original DynTRM layout:\n"
                         + "\n".join(f"  {p}" for p in problems))
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float32), params)
    attn = host["block"]["attn"]
    out: StateDict = {EMBED: host["embed"]}
    for i in range(m.num_attn_experts):
        for w in ("w1", "w2"):
            out[library_key(i, w)] = attn["library"][w][i].T
    out[LN_WEIGHT] = host["block"]["ln1"]["scale"]
    out[LN_BIAS] = host["block"]["ln1"]["bias"]
    for c in QKV:
        out[f"block.attn.proto_{c}"] = attn[f"proto_{c}"]
        out[f"block.attn.gate_{c}"] = attn[f"gate_{c}"]
    out[O_PROJ] = attn["o_proj"].T
    out[LM_HEAD] = host["lm_head"].T
    # safetensors (and torch's load_state_dict) want contiguous, owned buffers.
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _safetensors_numpy():
    try:
        from safetensors import numpy as st_numpy
    except ImportError as e:
        raise ImportError("reading or writing .safetensors files needs the optional package "
                          "'safetensors': pip install safetensors  (or: pip install "
                          "'tinyonn_jax[torch]'); a dict of numpy arrays works without it") from e
    return st_numpy


def load_safetensors(path: str | os.PathLike) -> StateDict:
    """Read a ``.safetensors`` file into a dict of numpy arrays."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors files can be read; convert a torch "
                         "checkpoint with safetensors.torch.save_file(model.state_dict(), path)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return dict(_safetensors_numpy().load_file(str(path)))


def save_safetensors(sd: Mapping[str, Any], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write a dict of arrays to ``path`` (a ``.safetensors`` file); returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the file name must end in .safetensors")
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in sd.items()}
    _safetensors_numpy().save_file(arrays, str(path), metadata=metadata)
    return path
