"""Seed 002 dashboards: ``core_metrics_latest.png`` and ``expert_dashboard_latest.png``.

Figures are built on ``matplotlib.figure.Figure`` (never pyplot), which renders with Agg, holds no
global state and is safe to call from a training loop or a background thread. Images are written
to a temporary file and renamed, so a viewer refreshing the PNG never sees half an image.
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

CORE_METRICS_PNG = "core_metrics_latest.png"
EXPERT_DASHBOARD_PNG = "expert_dashboard_latest.png"
EVENT_KINDS = ("add", "regenerate", "remove")
_EVENT_STYLE = {"add": ("^", "tab:green"), "regenerate": ("*", "tab:orange"),
                "remove": ("X", "tab:red")}
_MAX_POINTS = 2000  # per curve; more only adds rendering time
_MAX_COLUMNS = 300  # steps shown in the heatmap
_SCATTER_COLUMNS = 120  # fewer in the scatter: each needs room for a readable dot
_AXES_PT = (430.0, 300.0)  # approximate width, height of one expert-dashboard panel in points
_DEAD = "0.75"  # grey of dead expert slots


@dataclass(frozen=True)
class Panel:
    """One core-metrics panel: metric names matched by ``fnmatch`` patterns (``*`` spans ``/``).

    ``right`` patterns go on a twin y axis. The first pattern that matches a name claims it, so
    order patterns from specific to general.
    """

    title: str
    left: tuple[str, ...]
    ylabel: str
    right: tuple[str, ...] = ()
    right_ylabel: str = ""
    ylim: tuple[float, float] | None = None
    smooth: bool = True  # EMA over noisy per-step values; off for counters


# Which metric names each panel of seed 002 shows. A panel whose patterns match nothing in the
# history says "no data" and lists them, so a renamed metric is visible rather than silent.
CORE_PANELS: tuple[Panel, ...] = (
    Panel("Loss", ("train/main_loss", "train/loss", "train/*loss*", "eval/*loss*"), "loss"),
    Panel("Accuracy", ("train/main_acc*", "train/*acc*", "eval/*acc*"), "accuracy",
          ylim=(0.0, 1.02)),
    Panel("PI score", ("*pi_score*",), r"PI = $\exp(-\alpha(L/\tau + \gamma S))$",
          ylim=(0.0, 1.02)),
    Panel("Surprise & tau", ("*surprise*",), "surprise (grad norm)", right=("*/tau",),
          right_ylabel="tau (output entropy)"),
    Panel("Routing: avg_k per site", ("route/avg_k*", "route/k/*"), "active experts per token"),
    Panel("Expert dynamics", ("*num_experts*", "experts/*"), "experts",
          right=("route/active_frac*", "spl/activation_rate/*"), right_ylabel="active fraction",
          smooth=False),
)


def _out_path(path: str | Path, default_name: str) -> Path:
    p = Path(path)
    return p / default_name if p.is_dir() or not p.suffix else p


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def _no_data(ax: Axes, title: str, hint: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, f"no data\n{hint}", ha="center", va="center", color="0.45",
            fontsize=9, transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _match(names: Sequence[str], patterns: Sequence[str], taken: set[str]) -> list[str]:
    out: list[str] = []
    for pat in patterns:
        for name in sorted(names):
            if name not in taken and fnmatch.fnmatchcase(name, pat):
                taken.add(name)
                out.append(name)
    return out


def _labels(names: Sequence[str]) -> list[str]:
    """Drop the longest common ``a/b/`` prefix so legends stay short but unambiguous."""
    if len(names) < 2:
        return [n.split("/")[-1] if "/" in n else n for n in names]
    parts = [n.split("/") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join(p[common:]) for p in parts]


def _ema(values: np.ndarray, span: float) -> np.ndarray:
    alpha, out, acc = 2.0 / (span + 1.0), np.empty_like(values), np.nan
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc = v if not np.isfinite(acc) else acc + alpha * (v - acc)
        out[i] = acc
    return out


def _curves(ax: Axes, history: Mapping[str, Sequence[tuple[int, float]]], names: list[str],
            colors: list[Any], linestyle: str = "-", smooth: bool = True) -> None:
    for name, label, color in zip(names, _labels(names), colors, strict=True):
        data = np.asarray(history[name], dtype=np.float64).reshape(-1, 2)
        if len(data) > _MAX_POINTS:
            data = data[:: int(np.ceil(len(data) / _MAX_POINTS))]
        steps, vals = data[:, 0], data[:, 1]
        if smooth and len(vals) > 30:  # noisy per-step values: faint raw curve under an EMA
            ax.plot(steps, vals, color=color, alpha=0.25, linewidth=0.8, linestyle=linestyle)
            ax.plot(steps, _ema(vals, len(vals) / 20), color=color, linewidth=1.6,
                    linestyle=linestyle, label=f"{label} (EMA)")
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


def plot_core_metrics(history: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, *,
                      panels: Sequence[Panel] = CORE_PANELS, title: str = "Core metrics") -> Path:
    """Plot the 3x2 core-metrics dashboard (seed 002, figure 1) and return the PNG path.

    ``history`` maps metric names to ``(step, value)`` lists (``MetricsWriter.history``). ``path``
    is a file or a directory (then ``core_metrics_latest.png`` in it). Metrics are chosen by
    ``panels`` (default ``CORE_PANELS``); missing ones leave a "no data" panel.
    """
    history = {k: v for k, v in history.items() if len(v)}
    names = list(history)
    fig = Figure(figsize=(15, 12), layout="constrained")
    axes = fig.subplots(3, 2).reshape(-1)
    last = max((int(v[-1][0]) for v in history.values()), default=0)
    fig.suptitle(f"{title} (step {last})", fontsize=14)
    cycle = [f"C{i}" for i in range(10)]
    for ax, panel in zip(axes, panels, strict=False):
        taken: set[str] = set()
        left = _match(names, panel.left, taken)
        right = _match(names, panel.right, taken)
        if not left and not right:
            _no_data(ax, panel.title, "expected: " + ", ".join(panel.left + panel.right))
            continue
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.grid(True, alpha=0.3)
        colors = [cycle[i % 10] for i in range(len(left) + len(right))]
        if left:
            _curves(ax, history, left, colors[: len(left)], smooth=panel.smooth)
            ax.set_ylabel(panel.ylabel)
            if panel.ylim:
                ax.set_ylim(*panel.ylim)
            else:
                _maybe_log_scale(ax, history, left)
        handles, labels = ax.get_legend_handles_labels()
        if right:
            twin = ax.twinx()
            _curves(twin, history, right, colors[len(left):], linestyle="--",
                    smooth=panel.smooth)
            twin.set_ylabel(panel.right_ylabel)
            h2, l2 = twin.get_legend_handles_labels()
            handles, labels = handles + h2, labels + [f"{lb} (right)" for lb in l2]
        ax.legend(handles, labels, fontsize=8, loc="best", ncol=2 if len(labels) > 5 else 1)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return _save(fig, _out_path(path, CORE_METRICS_PNG))


@dataclass(frozen=True)
class LifecycleEvent:
    """An expert of ``site`` was added, regenerated or removed at ``step``."""

    step: int
    kind: str
    expert_id: int
    site: str


class ExpertLog:
    """Per-expert routing statistics over training, for ``plot_expert_dashboard``.

    Every ``record`` call stores, per site (e.g. ``"attn"``, ``"ffn"``), the activation rate of
    each expert (fraction of routed tokens that chose it) and optionally the live mask (experts
    are stacked in a fixed bank of P slots; dead slots are masked). Lifetime means are exact
    running sums that restart when an expert is added or regenerated; the per-step matrix keeps
    at most ``max_records`` rows per site by dropping every other row when full, so a long run
    stays covered end to end at a coarser step resolution.
    """

    def __init__(self, max_records: int = 1000) -> None:
        self.max_records = max(2, max_records)
        self.events: list[LifecycleEvent] = []
        self._steps: dict[str, list[int]] = {}
        self._rates: dict[str, list[np.ndarray]] = {}
        self._live: dict[str, list[np.ndarray]] = {}
        self._sum: dict[str, np.ndarray] = {}
        self._count: dict[str, np.ndarray] = {}

    @property
    def sites(self) -> list[str]:
        """Site names in the order they were first recorded."""
        return list(self._steps)

    def record(self, step: int, values: Mapping[str, Any], *,
               live: Mapping[str, Any] | None = None, tokens: float | None = None) -> None:
        """Add one step. ``values[site]`` (P,) are activation rates, or counts if ``tokens``
        (the number of routed tokens) is given. ``live[site]`` (P,) bool defaults to the
        site's previous mask, or all experts live."""
        for site, v in values.items():
            rates = np.asarray(v, dtype=np.float64).reshape(-1)
            if tokens is not None:
                rates = rates / max(float(tokens), 1.0)
            prev = self._live.get(site)
            if live is not None and site in live:
                mask = np.asarray(live[site], dtype=bool).reshape(-1)
            elif prev:
                mask = _fit(prev[-1], rates.size, fill=True)
            else:
                mask = np.ones(rates.size, dtype=bool)
            if mask.size != rates.size:
                raise ValueError(f"ExpertLog site {site!r}: live mask has {mask.size} experts, "
                                 f"values have {rates.size}")
            self._steps.setdefault(site, []).append(int(step))
            self._rates.setdefault(site, []).append(rates)
            self._live.setdefault(site, []).append(mask)
            total = _fit(self._sum.get(site, np.zeros(0)), rates.size, fill=0.0)
            count = _fit(self._count.get(site, np.zeros(0)), rates.size, fill=0.0)
            self._sum[site] = total + np.where(mask, rates, 0.0)
            self._count[site] = count + mask
            if len(self._steps[site]) > self.max_records:
                for store in (self._steps, self._rates, self._live):
                    store[site] = store[site][::2]

    def event(self, step: int, kind: str, expert_id: int, *, site: str = "ffn") -> None:
        """Note a lifecycle event; ``add``/``regenerate`` restart the expert's lifetime mean."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"ExpertLog event kind {kind!r}: must be one of {EVENT_KINDS}")
        self.events.append(LifecycleEvent(int(step), kind, int(expert_id), site))
        if kind != "remove" and site in self._sum and expert_id < self._sum[site].size:
            self._sum[site][expert_id] = 0.0
            self._count[site][expert_id] = 0.0

    def matrix(self, site: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return steps (S,), rates (S, P) and live (S, P); P is the largest bank recorded."""
        width = max(r.size for r in self._rates[site])
        rates = np.stack([_fit(r, width, fill=np.nan) for r in self._rates[site]])
        live = np.stack([_fit(m, width, fill=False) for m in self._live[site]])
        return np.asarray(self._steps[site]), rates, live

    def lifetime_rates(self, site: str) -> np.ndarray:
        """Mean activation rate (P,) of each expert over its current lifetime (NaN if unseen)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._sum[site] / self._count[site]


def _fit(a: np.ndarray, size: int, *, fill: Any) -> np.ndarray:
    if a.size >= size:
        return a[:size].copy()
    return np.concatenate([a, np.full(size - a.size, fill, dtype=np.result_type(a, fill))])


def _bin_columns(steps: np.ndarray, rates: np.ndarray, live: np.ndarray,
                 max_columns: int = _MAX_COLUMNS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average consecutive steps into at most ``max_columns`` columns; NaN where dead."""
    shown = np.where(live, rates, np.nan)
    n = int(np.ceil(len(steps) / max_columns))
    if n <= 1:
        return steps, shown, live
    starts = np.arange(0, len(steps), n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN group: expert dead there
        cols = np.stack([np.nanmean(shown[i:i + n], axis=0) for i in starts])
    return (np.array([steps[min(i + n, len(steps)) - 1] for i in starts]), cols,
            np.stack([live[i:i + n].any(axis=0) for i in starts]))


def _stacked(log: ExpertLog, sites: Sequence[str]) -> dict[str, Any]:
    """Put the experts of all sites on one y axis: rows ``offset[site] + expert_id``."""
    steps = np.unique(np.concatenate([log.matrix(s)[0] for s in sites]))
    blocks, offsets, row = [], {}, 0
    for site in sites:
        s_steps, rates, live = log.matrix(site)
        idx = np.searchsorted(steps, s_steps)
        full_r = np.full((len(steps), rates.shape[1]), np.nan)
        full_l = np.zeros((len(steps), rates.shape[1]), dtype=bool)
        full_r[idx], full_l[idx] = rates, live
        blocks.append((full_r, full_l))
        offsets[site] = row
        row += rates.shape[1]
    rates = np.concatenate([b[0] for b in blocks], axis=1)
    live = np.concatenate([b[1] for b in blocks], axis=1)
    return {"steps": steps, "rates": rates, "live": live, "offsets": offsets, "rows": row}


def _site_axis(ax: Axes, offsets: Mapping[str, int], rows: int) -> None:
    """Tick each site's bank with its own expert ids and name the banks on the right."""
    ax.set_ylim(-0.5, rows - 0.5)
    ax.set_ylabel("expert id")
    bounds = [*offsets.values(), rows]
    ticks, labels = [], []
    for (site, off), end in zip(offsets.items(), bounds[1:], strict=True):
        size = end - off
        every = max(1, int(np.ceil(size / max(2, 16 * size // rows))))
        ticks += [off + i for i in range(0, size, every)]
        labels += [str(i) for i in range(0, size, every)]
        if len(offsets) > 1:
            if off:
                ax.axhline(off - 0.5, color="0.2", linewidth=1.0)
            ax.text(1.01, off + size / 2 - 0.5, site, transform=ax.get_yaxis_transform(),
                    rotation=90, va="center", ha="left", fontsize=9, fontweight="bold")
    ax.set_yticks(ticks, labels, fontsize=8)


def plot_expert_dashboard(expert_log: ExpertLog, path: str | Path, *,
                          sites: Sequence[str] | None = None,
                          title: str = "Expert dashboard") -> Path:
    """Plot the 2x2 expert dashboard (seed 002, figure 2) and return the PNG path.

    Panels: router-choice scatter (step x expert, size and colour = activation rate, lifecycle
    events marked), mean activation rate over each expert's current lifetime, router-choice
    heatmap (expert x step, grey = dead slot), and live / active expert counts per site.
    ``sites`` defaults to all recorded sites, stacked on one expert axis. ``path`` is a file or a
    directory (then ``expert_dashboard_latest.png`` in it).
    """
    sites = list(sites) if sites is not None else expert_log.sites
    sites = [s for s in sites if s in expert_log.sites]
    fig = Figure(figsize=(16, 11), layout="constrained")
    (ax_sc, ax_bar), (ax_hm, ax_n) = fig.subplots(2, 2)
    titles = ("Router choice scatter", "Lifecycle activation rate", "Router choice heatmap",
              "Expert count")
    if not sites:
        fig.suptitle(title, fontsize=14)
        for ax, t in zip((ax_sc, ax_bar, ax_hm, ax_n), titles, strict=True):
            _no_data(ax, t, "ExpertLog.record() was never called")
        return _save(fig, _out_path(path, EXPERT_DASHBOARD_PNG))
    data = _stacked(expert_log, sites)
    steps, rates, live, offsets, rows = (data[k] for k in
                                         ("steps", "rates", "live", "offsets", "rows"))
    fig.suptitle(f"{title} (step {int(steps[-1])}; sites: {', '.join(sites)})", fontsize=14)
    b_steps, b_rates, b_live = _bin_columns(steps, rates, live)
    vmax = float(np.nanmax(b_rates)) if np.isfinite(b_rates).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0

    # 1. Scatter: one dot per (step, live expert) that was chosen at all.
    sc_steps, sc_rates, sc_live = _bin_columns(steps, rates, live, _SCATTER_COLUMNS)
    xs, ys = np.meshgrid(sc_steps, np.arange(rows), indexing="ij")
    on = sc_live & (np.nan_to_num(sc_rates) > 0)
    # Largest dot about one row / column cell, so dots never merge into a carpet.
    cell = min(_AXES_PT[1] / rows, _AXES_PT[0] / len(sc_steps))
    sc = ax_sc.scatter(xs[on], ys[on], s=0.5 + cell**2 * sc_rates[on] / vmax, c=sc_rates[on],
                       cmap="viridis", vmin=0, vmax=vmax, linewidths=0)
    fig.colorbar(sc, ax=ax_sc, label="activation rate", pad=0.06)
    for kind in EVENT_KINDS:
        ev = [e for e in expert_log.events if e.kind == kind and e.site in offsets]
        if ev:
            marker, color = _EVENT_STYLE[kind]
            ax_sc.scatter([e.step for e in ev], [offsets[e.site] + e.expert_id for e in ev],
                          marker=marker, s=70, color=color, edgecolors="black",
                          linewidths=0.5, label=f"{kind} ({len(ev)})", zorder=3)
    if ax_sc.get_legend_handles_labels()[0]:
        ax_sc.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3,
                     title="lifecycle events", title_fontsize=8, frameon=False)
    ax_sc.set_title(titles[0])
    ax_sc.set_xlabel("step")
    _site_axis(ax_sc, offsets, rows)

    # 2. Lifetime means as horizontal bars, one colour per site, faded when removed.
    for i, site in enumerate(sites):
        mean = expert_log.lifetime_rates(site)
        alive = expert_log.matrix(site)[2][-1]
        colors = [f"C{i}" if a else _DEAD for a in alive]
        ax_bar.barh(offsets[site] + np.arange(mean.size), np.nan_to_num(mean), height=0.8,
                    color=colors)
    legend = [Patch(color=f"C{i}", label=site) for i, site in enumerate(sites)]
    ax_bar.legend(handles=legend + [Patch(color=_DEAD, label="dead now")], fontsize=8,
                  loc="best", framealpha=0.9)
    ax_bar.set_title(titles[1])
    ax_bar.set_xlabel("mean activation rate over the expert's current lifetime")
    ax_bar.grid(True, axis="x", alpha=0.3)
    _site_axis(ax_bar, offsets, rows)

    # 3. Heatmap: pcolormesh copes with unevenly spaced logged steps.
    edges = np.concatenate([[b_steps[0] - 0.5], (b_steps[:-1] + b_steps[1:]) / 2,
                            [b_steps[-1] + 0.5]])
    cmap = colormaps["viridis"].with_extremes(bad=_DEAD)
    mesh = ax_hm.pcolormesh(edges, np.arange(rows + 1) - 0.5, np.ma.masked_invalid(b_rates.T),
                            cmap=cmap, vmin=0, vmax=vmax, shading="flat")
    fig.colorbar(mesh, ax=ax_hm, label="activation rate (grey = dead slot)", pad=0.06)
    ax_hm.set_title(titles[2])
    ax_hm.set_xlabel("step")
    _site_axis(ax_hm, offsets, rows)

    # 4. How many experts exist and how many were chosen at all, per site.
    for i, site in enumerate(sites):
        s_steps, s_rates, s_live = expert_log.matrix(site)
        ax_n.plot(s_steps, s_live.sum(axis=1), color=f"C{i}", linewidth=1.8,
                  drawstyle="steps-post", label=f"{site}: live")
        ax_n.plot(s_steps, (s_live & (np.nan_to_num(s_rates) > 0)).sum(axis=1),
                  color=f"C{i}", linestyle="--", linewidth=1.2, drawstyle="steps-post",
                  label=f"{site}: chosen (>0)")
    for e in expert_log.events:
        if e.site in offsets:
            ax_n.axvline(e.step, color=_EVENT_STYLE[e.kind][1], alpha=0.25, linewidth=0.8)
    ax_n.set_title(titles[3] + " (vertical lines: lifecycle events)")
    ax_n.set_xlabel("step")
    ax_n.set_ylabel("experts")
    ax_n.set_ylim(bottom=0)
    ax_n.grid(True, alpha=0.3)
    ax_n.legend(fontsize=8, loc="lower left", ncol=2 if len(sites) > 2 else 1)
    for ax in (ax_sc, ax_hm, ax_n):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    return _save(fig, _out_path(path, EXPERT_DASHBOARD_PNG))

