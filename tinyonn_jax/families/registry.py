"""The model families the training program can run, by name (``Config.family``).

  dyntrm  DynTRM with DynSIHA+ / DynMoE and SARS (seed 000)          families/dyntrm/
  spl     SparseProtoLinear, MoIE, Dimension-DynSIHA with M-SAPS (seed 001)   families/spl/
  dynonn  DynSMHA + GAMoE-gated DynMoE, 1f2b1o PI-adaptive gating, live expert pool
          (seeds 002-004)                                             families/dynonn/
"""

from __future__ import annotations

from tinyonn_jax.config import Config
from tinyonn_jax.families.dynonn.family import DYNONN
from tinyonn_jax.families.dyntrm.family import DYNTRM
from tinyonn_jax.families.spl.family import SPL
from tinyonn_jax.family import FamilyBase

FAMILIES: dict[str, FamilyBase] = {f.name: f for f in (DYNTRM, SPL, DYNONN)}


def get_family(cfg: Config) -> FamilyBase:
    """The family ``cfg.family`` names (``Config`` has checked the name)."""
    return FAMILIES[cfg.family]
