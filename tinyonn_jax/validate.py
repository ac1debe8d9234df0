"""Host-side input checks that turn silent misbehaviour into a ``ValueError`` naming the input.

Without them an out-of-range token id is never an error: the embedding lookup is a JAX gather,
which clamps out-of-bounds indices, so token 1000 and token -1 both read the last embedding row,
and a model whose ``vocab_size`` is smaller than the tokenizer's trains on clamped ids.

Everything here is numpy on the host. Shape, dtype and parameter-tree checks are static, so they
also run while JAX traces a function (under ``jax.jit``). Value checks (token ranges, prompt
lengths) run only on concrete arrays and are skipped for a ``jax.core.Tracer``, so a check never
forces a device sync inside a trace. Every check raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from tinyonn_jax.data.tokenizer import VOCAB_SIZE
from tinyonn_jax.errors import ConfigError

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
_INT_BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _dtype(x: Any) -> np.dtype:
    dt = getattr(x, "dtype", None)
    return np.dtype(dt) if dt is not None else np.asarray(x).dtype


def _is_int(x: Any) -> bool:
    return np.issubdtype(_dtype(x), np.integer)  # bool is not an integer dtype here


def _position(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(flat_index), shape))


def check_token_range(tokens: Any, vocab_size: int, name: str = "tokens") -> None:
    """Raise ``ValueError`` unless every token id of ``tokens`` lies in ``[0, vocab_size)``.

    ``tokens``: a numpy array or a concrete JAX array of integers (any shape). The message names
    ``name``, the offending minimum and/or maximum with the position of its first occurrence,
    the number of out-of-range ids and the valid range. A traced array (``jax.core.Tracer``)
    holds no values and is not checked; an empty array passes.
    """
    if _is_tracer(tokens):
        return
    a = np.asarray(tokens)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {a.dtype}")
    if a.size == 0:
        return
    lo, hi = a.min(), a.max()
    if lo >= 0 and hi < vocab_size:
        return
    parts = []
    if lo < 0:
        parts.append(f"min {int(lo)} at position {_position(np.argmin(a), a.shape)}")
    if hi >= vocab_size:
        parts.append(f"max {int(hi)} at position {_position(np.argmax(a), a.shape)}")
    n_bad = int(np.count_nonzero((a < 0) | (a >= vocab_size)))
    raise ValueError(
        f"{name} has {n_bad} token id(s) outside the valid range [0, {vocab_size}): "
        f"{', '.join(parts)} (shape {a.shape})"
    )


def check_vocab(vocab_size: Any, where: str = "config", field: str = "model.vocab_size") -> None:
    """Raise ``ConfigError`` (a ``ValueError``) when a model vocabulary cannot hold every ARC
    tokenizer token.

    The tokenizer (``tinyonn_jax.data.tokenizer``) emits ``VOCAB_SIZE`` = 18 distinct ids; a
    smaller model vocabulary would silently clamp the larger ids. ``where`` names the source of
    the value (a config file, a checkpoint) at the start of the message; ``field`` the config
    field (``spl.vocab_size`` / ``moe.vocab_size`` for the other model families).
    """
    if not isinstance(vocab_size, (int, np.integer)) or isinstance(vocab_size, bool):
        raise ConfigError(f"{where}: {field} must be an integer, got {vocab_size!r}")
    if vocab_size < VOCAB_SIZE:
        raise ConfigError(
            f"{where}: {field}={int(vocab_size)} is smaller than the ARC tokenizer's "
            f"{VOCAB_SIZE} tokens (tinyonn_jax.data.tokenizer.VOCAB_SIZE); token ids >= "
            f"{int(vocab_size)} would be clamped onto the last embedding row"
        )


def check_batch(batch: Mapping[str, Any], vocab_size: int) -> None:
    """Check one training batch on the host, before it is sharded and fed to a jitted step.

    ``batch`` holds ``inputs``, ``targets``, ``weights``, ``segment_ids`` and ``positions``, all
    of one shape (B, T) with B, T >= 1; all but ``weights`` have an integer dtype, ``weights`` a
    real one with finite values >= 0. Every id of ``inputs``, and of ``targets`` where
    ``weights > 0``, must lie in ``[0, vocab_size)``. Vectorised min/max only; the value checks
    are skipped for traced arrays.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch must be a dict of arrays, got {type(batch).__name__}")
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; a training batch holds {list(BATCH_KEYS)}")
    shape = tuple(np.shape(batch["inputs"]))
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"batch['inputs'] must have shape (B, T) with B, T >= 1, got {shape}")
    for k in BATCH_KEYS:
        got = tuple(np.shape(batch[k]))
        if got != shape:
            raise ValueError(f"batch[{k!r}] has shape {got}, batch['inputs'] has {shape}")
    for k in _INT_BATCH_KEYS:
        if not _is_int(batch[k]):
            raise ValueError(f"batch[{k!r}] must have an integer dtype, got {_dtype(batch[k])}")
    w_dtype = _dtype(batch["weights"])
    if not (np.issubdtype(w_dtype, np.floating) or np.issubdtype(w_dtype, np.integer)):
        raise ValueError(f"batch['weights'] must have a real dtype, got {w_dtype}")
    if any(_is_tracer(batch[k]) for k in ("inputs", "targets", "weights")):
        return
    w = np.asarray(batch["weights"])
    if not np.isfinite(w).all() or w.min() < 0:
        bad = np.flatnonzero(~np.isfinite(w) | (w < 0))[0]
        raise ValueError(
            f"batch['weights'] must be finite and >= 0, got {w.flat[bad]} at position "
            f"{_position(bad, w.shape)}"
        )
    check_token_range(batch["inputs"], vocab_size, "batch['inputs']")
    # Unweighted targets (padding, prompt tokens) never reach the loss; 0 is always in range.
    targets = np.where(w > 0, np.asarray(batch["targets"]), 0)
    check_token_range(targets, vocab_size, "batch['targets'] (where weights > 0)")


ParamLayout = tuple[Any, tuple[tuple[int, ...], ...], dict[str, tuple[int, ...]]]


def param_layout(shapes: Any) -> ParamLayout:
    """(treedef, leaf shapes, {path: shape}) of a parameter tree (arrays or shape structs)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    by_path = {jax.tree_util.keystr(p): tuple(s.shape) for p, s in flat}
    return treedef, tuple(by_path.values()), by_path


def check_params(params: Any, cfg, layout: ParamLayout) -> None:
    """Raise ``ValueError`` unless ``params`` has the tree and leaf shapes of ``layout``.

    ``layout`` is the ``param_layout`` of the model of ``cfg`` (a model config: its hidden width
    and vocabulary name the model in the message). The message names the first mismatching
    parameter path with its shape and the expected shape. Static: runs on traced parameters
    too. Container types may differ when the key paths are the same.
    """
    want_def, want_shapes, want = layout
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if treedef == want_def and all(
        tuple(np.shape(a)) == s for a, s in zip(leaves, want_shapes, strict=True)
    ):
        return
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    got = {jax.tree_util.keystr(p): tuple(np.shape(a)) for p, a in flat}
    problems = [f"params lacks {k} (expected shape {s})" for k, s in want.items() if k not in got]
    problems += [f"params{k} has shape {got[k]}, expected {s}" for k, s in want.items()
                 if k in got and got[k] != s]
    problems += [f"params has unexpected {k} of shape {s}" for k, s in got.items()
                 if k not in want]
    if not problems:
        return
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise ValueError(
        f"params do not match the model of cfg (hidden={cfg.hidden}, vocab_size="
        f"{cfg.vocab_size}): {problems[0]}{more}"
    )


def _check_tokens_matrix(tokens: Any, name: str = "tokens") -> tuple[int, int]:
    """Static checks of a (B, T) token array; returns its shape."""
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
        raise ValueError(
            f"{name} must be a (B, T) integer array (numpy or jax), got {type(tokens).__name__}"
        )
    shape = tuple(tokens.shape)
    if len(shape) != 2:
        raise ValueError(f"{name} must have shape (B, T) (rank 2), got shape {shape}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} must have shape (B, T) with B >= 1 and T >= 1, got {shape}")
    if not _is_int(tokens):
        raise ValueError(f"{name} must have an integer dtype (token ids), got {_dtype(tokens)}")
    return shape


def check_forward_inputs(params: Any, tokens: Any, cfg, layout: ParamLayout,
                         positions: Any = None, segment_ids: Any = None) -> None:
    """The checks of ``transformer.forward`` / ``forward_adaptive``.

    ``tokens`` must be an integer (B, T) array with B, T >= 1; ``positions`` and
    ``segment_ids``, when given, integer arrays of the same shape; ``params`` the parameter tree
    of the model of ``cfg`` (``check_params`` against ``layout``). Concrete ``tokens`` are also
    range-checked against ``cfg.vocab_size``. All but the range check are static and run
    under ``jax.jit``.
    """
    shape = _check_tokens_matrix(tokens)
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
        if arr is None:
            continue
        got = tuple(np.shape(arr))
        if got != shape:
            raise ValueError(f"{name} must have the shape of tokens {shape}, got {got}")
        if not _is_int(arr):
            raise ValueError(f"{name} must have an integer dtype, got {_dtype(arr)}")
    check_params(params, cfg, layout)
    check_token_range(tokens, cfg.vocab_size)


def check_generate_inputs(params: Any, tokens: Any, lengths: Any, cfg,
                          layout: ParamLayout) -> None:
    """The checks of ``eval.generate.generate``: ``check_forward_inputs`` for the left-padded
    prompts ``tokens`` (B, Tp), and integer ``lengths`` of shape (B,) with values in [1, Tp]
    (the latter only for concrete ``lengths``)."""
    b, tp = _check_tokens_matrix(tokens)
    got = tuple(np.shape(lengths))
    if got != (b,):
        raise ValueError(f"lengths must have shape (B,) = ({b},) like tokens {(b, tp)}, got {got}")
    if not _is_int(lengths):
        raise ValueError(f"lengths must have an integer dtype, got {_dtype(lengths)}")
    check_forward_inputs(params, tokens, cfg, layout)
    if _is_tracer(lengths):
        return
    n = np.asarray(lengths)
    bad = np.flatnonzero((n < 1) | (n > tp))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"lengths[{i}] = {int(n[i])} is outside [1, {tp}] (the prompt width Tp of tokens); "
            f"{bad.size} row(s) out of range"
        )
