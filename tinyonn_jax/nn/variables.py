"""The two parameter groups, one vocabulary everywhere: ``main`` (computation), ``meta`` (routing).

Routing parameters are the prototypes and gates/thresholds of every router; everything else
(embedding, norms, expert banks, projections, LM head, halting head) is computation.
"""

from __future__ import annotations

import jax

MAIN, META = "main", "meta"
_META_PREFIXES = ("proto", "gate")


def _label(path) -> str:
    name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
    return META if name.startswith(_META_PREFIXES) else MAIN


def param_labels(params):
    """A pytree of 'main' / 'meta' strings with the structure of ``params``."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _label(p), params)


def mask_of(params, group: str):
    """Boolean pytree: True on the leaves of ``group``."""
    return jax.tree.map(lambda lab: lab == group, param_labels(params))


def select(tree, labels, group: str):
    """Zero every leaf outside ``group`` (keeps structure, for gradient isolation)."""
    return jax.tree.map(lambda x, lab: x if lab == group else jax.numpy.zeros_like(x), tree, labels)
