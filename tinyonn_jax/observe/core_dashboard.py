"""The core-metrics dashboard of seed 002 (figure 1, ``core_metrics_latest.png``): six panels
of the ``metrics.SEED002_METRICS`` curves from a metrics history, as a matplotlib Figure.

Figures are built on ``matplotlib.figure.Figure`` (never pyplot): it renders with Agg, holds no
global state and is safe to call from a training loop. What a panel plots can be read back from
the figure: each panel's axis is labelled with its title (``ax.get_label()``), its twin axis
``"<title> (right)"``, and each curve with its series label.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tinyonn_jax.metrics import PI_FORMULA

_MAX_POINTS = 2000  # per curve; more only adds rendering time


@dataclass(frozen=True)
class Series:
    """One curve (or family of curves) of a core-metrics panel.

    ``name`` is an exact metric name, or an ``fnmatch`` pattern ending in ``*`` whose matches
    are labelled ``label`` + the matched tail (``route/avg_k/*`` -> ``avg_k/ffn``). A required
    series the history lacks is written on the panel as "<label>: not defined for this family";
    an ``optional`` one (a metric only some families have, or a per-site breakdown) is left out.
    """

    name: str
    label: str
    right: bool = False  # on the panel's twin y axis
    optional: bool = False


@dataclass(frozen=True)
class Panel:
    """One core-metrics panel: its title, its series and how its axes read."""

    title: str
    series: tuple[Series, ...]
    ylabel: str
    right_ylabel: str = ""
    ylim: tuple[float, float] | None = None
    smooth: bool = True  # EMA over noisy per-step values; off for counters
    note: str = ""  # a line under the title (the PI panel's formula)


# Seed 002, figure 1 (core_metrics_latest.png): exactly its six panels, in its order, with the
# metric names of ``metrics.SEED002_METRICS``.
CORE_PANELS: tuple[Panel, ...] = (
    Panel("Loss", (Series("train/main_loss", "main_loss"),
                   Series("train/gating_loss", "gating_loss"),
                   Series("train/sparsity_loss", "sparsity_loss")), "loss"),
    Panel("Accuracy", (Series("train/main_acc", "main_acc"),
                       Series("train/gating_acc", "gating_acc")), "accuracy",
          ylim=(0.0, 1.02)),
    Panel("PI Score", (Series("train/pi_score", "pi_score"),
                       Series("train/lambda", "lambda(PI)", right=True, optional=True)),
          "pi_score", right_ylabel="lambda(PI)", ylim=(0.0, 1.02), note=PI_FORMULA),
    Panel("Surprise & Tau", (Series("train/surprise", "surprise"),
                             Series("train/tau", "tau", right=True)),
          "surprise (gradient norm)", right_ylabel="tau (output entropy, nats)"),
    Panel("DynNSA Dynamics", (Series("train/avg_k", "avg_k"),
                              Series("route/avg_k/*", "avg_k/", optional=True)),
          "avg_k (experts per token)"),
    Panel("Expert Dynamics", (Series("train/num_experts", "num_experts"),), "num_experts",
          smooth=False),
)
SMOOTH_MIN_POINTS = 30  # a smoothed panel draws an EMA over curves longer than this
SMOOTH_SPAN_DIVISOR = 20  # EMA span = points / this


def no_data(ax: Axes, title: str, hint: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, hint, ha="center", va="center", color="0.45", fontsize=9,
            transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _resolve(series: Series, history: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(metric name, legend label) of every curve ``series`` draws from ``history``."""
    if "*" not in series.name:
        return [(series.name, series.label)] if series.name in history else []
    prefix = series.name[: series.name.index("*")]
    return [(n, series.label + n[len(prefix):]) for n in sorted(history)
            if fnmatch.fnmatchcase(n, series.name)]


def ema(values: np.ndarray, span: float) -> np.ndarray:
    """Exponential moving average ``acc += 2 / (span + 1) (v - acc)``, starting at the first
    finite value; non-finite values keep the previous average."""
    alpha, out, acc = 2.0 / (span + 1.0), np.empty_like(values), np.nan
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc = v if not np.isfinite(acc) else acc + alpha * (v - acc)
        out[i] = acc
    return out


def _curves(ax: Axes, history: Mapping[str, Sequence[tuple[int, float]]],
            curves: list[tuple[str, str]], colors: list[Any], linestyle: str = "-",
            smooth: bool = True) -> None:
    for (name, label), color in zip(curves, colors, strict=True):
        data = np.asarray(history[name], dtype=np.float64).reshape(-1, 2)
        if len(data) > _MAX_POINTS:
            data = data[:: int(np.ceil(len(data) / _MAX_POINTS))]
        steps, vals = data[:, 0], data[:, 1]
        if smooth and len(vals) > SMOOTH_MIN_POINTS:  # faint raw curve under an EMA
            ax.plot(steps, vals, color=color, alpha=0.25, linewidth=0.8, linestyle=linestyle,
                    label=f"_raw {label}")  # a leading "_" keeps it out of the legend
            ax.plot(steps, ema(vals, len(vals) / SMOOTH_SPAN_DIVISOR), color=color,
                    linewidth=1.6, linestyle=linestyle, label=f"{label} (EMA)")
        else:
            ax.plot(steps, vals, color=color, linewidth=1.6, linestyle=linestyle,
                    marker="o" if len(vals) < 10 else None, markersize=3, label=label)


def _maybe_log_scale(ax: Axes, history: Mapping[str, Sequence[tuple[int, float]]],
                     names: list[str]) -> None:
    vals = np.concatenate([np.asarray(history[n], dtype=np.float64).reshape(-1, 2)[:, 1]
                           for n in names])
    vals = vals[np.isfinite(vals)]
    if vals.size and vals.min() > 0 and vals.max() / vals.min() > 100:
        ax.set_yscale("log")


def _core_panel(ax: Axes, panel: Panel, history: Mapping[str, Sequence[tuple[int, float]]],
                has_data: bool) -> None:
    """Draw one panel on ``ax``; a twin axis (label ``<title> (right)``) holds right series."""
    ax.set_label(panel.title)
    left = [c for s in panel.series if not s.right for c in _resolve(s, history)]
    right = [c for s in panel.series if s.right for c in _resolve(s, history)]
    missing = [s.label for s in panel.series if not s.optional and not _resolve(s, history)]
    if not left and not right:
        hint = (", ".join(missing) + ": not defined for this family") if has_data else (
            "no data yet")
        no_data(ax, panel.title, hint)
        return
    ax.set_title(panel.title, pad=16 if panel.note else 6)
    if panel.note:
        ax.text(0.5, 1.01, panel.note, transform=ax.transAxes, ha="center", va="bottom",
                fontsize=8.5, color="0.25")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.grid(True, alpha=0.3)
    colors = [f"C{i % 10}" for i in range(len(left) + len(right))]
    if left:
        _curves(ax, history, left, colors[: len(left)], smooth=panel.smooth)
        if not panel.smooth:  # a counter: whole numbers on its axis
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        else:
            _maybe_log_scale(ax, history, [n for n, _ in left])
    ax.set_ylabel(panel.ylabel)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        twin = ax.twinx()
        twin.set_label(f"{panel.title} (right)")
        _curves(twin, history, right, colors[len(left):], linestyle="--", smooth=panel.smooth)
        twin.set_ylabel(panel.right_ylabel)
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + [f"{lb} (right)" for lb in l2]
    ax.legend(handles, labels, fontsize=8, loc="best", ncol=2 if len(labels) > 5 else 1)
    if missing:
        ax.text(0.99, 0.02, "\n".join(f"{m}: not defined for this family" for m in missing),
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color="0.4")


def core_metrics_figure(history: Mapping[str, Sequence[tuple[int, float]]], *,
                        panels: Sequence[Panel] = CORE_PANELS,
                        title: str = "Core metrics") -> Figure:
    """The 3x2 core-metrics dashboard (seed 002, figure 1) as a Figure.

    ``history`` maps metric names to ``(step, value)`` lists (``MetricsWriter.history``). Each
    panel axis carries its panel title as its label (``ax.get_label()``), a twin axis the label
    ``"<title> (right)"``; a curve's label is its series label (``"... (EMA)"`` when smoothed).
    """
    history = {k: v for k, v in history.items() if len(v)}
    fig = Figure(figsize=(15, 12), layout="constrained")
    axes = fig.subplots(3, 2).reshape(-1)
    last = max((int(v[-1][0]) for v in history.values()), default=0)
    fig.suptitle(f"{title} (step {last})", fontsize=14)
    for ax, panel in zip(axes, panels, strict=False):
        _core_panel(ax, panel, history, has_data=bool(history))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig
