"""Seed 002 dashboards as PNG files: ``core_metrics_latest.png`` and
``expert_dashboard_latest.png``.

The figures come from ``observe.core_dashboard`` and ``observe.expert_dashboard`` (re-exported
here with ``ExpertLog``). Images are written to a temporary file and renamed, so a viewer
refreshing the PNG never sees half an image.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from tinyonn_jax.observe.core_dashboard import CORE_PANELS, Panel, Series, core_metrics_figure
from tinyonn_jax.observe.expert_dashboard import (
    EXPERT_PANELS,
    ExpertRows,
    expert_dashboard_figure,
    stack_experts,
)
from tinyonn_jax.observe.expert_log import EVENT_KINDS, ExpertLog, LifecycleEvent

__all__ = ["CORE_METRICS_PNG", "CORE_PANELS", "EVENT_KINDS", "EXPERT_DASHBOARD_PNG",
           "EXPERT_PANELS", "ExpertLog", "ExpertRows", "LifecycleEvent", "Panel", "Series",
           "core_metrics_figure", "expert_dashboard_figure", "stack_experts",
           "plot_core_metrics", "plot_expert_dashboard"]

CORE_METRICS_PNG = "core_metrics_latest.png"
EXPERT_DASHBOARD_PNG = "expert_dashboard_latest.png"


def _out_path(path: str | Path, default_name: str) -> Path:
    p = Path(path)
    return p / default_name if p.is_dir() or not p.suffix else p


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def plot_core_metrics(history: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, *,
                      panels: Sequence[Panel] = CORE_PANELS, title: str = "Core metrics") -> Path:
    """Write ``core_metrics_figure`` as a PNG and return its path.

    ``path`` is a file or a directory (then ``core_metrics_latest.png`` in it).
    """
    fig = core_metrics_figure(history, panels=panels, title=title)
    return _save(fig, _out_path(path, CORE_METRICS_PNG))


def plot_expert_dashboard(expert_log: ExpertLog, path: str | Path, *,
                          sites: Sequence[str] | None = None,
                          title: str = "Expert dashboard") -> Path:
    """Write ``expert_dashboard_figure`` as a PNG and return its path.

    ``path`` is a file or a directory (then ``expert_dashboard_latest.png`` in it).
    """
    fig = expert_dashboard_figure(expert_log, sites=sites, title=title)
    return _save(fig, _out_path(path, EXPERT_DASHBOARD_PNG))
