"""The expert dashboard of seed 002 (figure 2, ``expert_dashboard_latest.png``) from an
``ExpertLog``, as a matplotlib Figure: router-choice scatter, lifecycle activation rate,
router-choice heatmap and the expert count over time.

Each panel's axis is labelled with its title (``EXPERT_PANELS``). ``stack_experts`` returns the
rows the scatter, bar and heatmap panels draw: the experts of all sites on one axis, in bins of
consecutive experts when there are many (SPL's neurons).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from tinyonn_jax.observe.core_dashboard import no_data
from tinyonn_jax.observe.expert_log import EVENT_KINDS, ExpertLog

# Seed 002, figure 2: its three panels plus the expert count.
EXPERT_PANELS = ("Router Choice Scatter", "Lifecycle Activation Rate", "Router Choice Heatmap",
                 "Expert Count")
MAX_EXPERT_ROWS = 128  # expert rows drawn; more experts are binned (readable dots and bars)
_EVENT_STYLE = {"add": ("^", "tab:green"), "regenerate": ("*", "tab:orange"),
                "remove": ("X", "tab:red")}
_MAX_COLUMNS = 300  # steps shown in the heatmap
_SCATTER_COLUMNS = 120  # fewer in the scatter: each needs room for a readable dot
_AXES_PT = (430.0, 300.0)  # approximate width, height of one expert-dashboard panel in points
_DEAD = "0.75"  # grey of dead expert slots


def _bin_columns(steps: np.ndarray, rates: np.ndarray, live: np.ndarray,
                 max_columns: int = _MAX_COLUMNS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average consecutive steps into at most ``max_columns`` columns; NaN where dead.

    steps (S,), rates and live (S, R) -> (C,), (C, R), (C, R); a column is stamped with the
    last step it covers.
    """
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


def _bin_rows(a: np.ndarray, size: int, *, live: bool = False) -> np.ndarray:
    """Group the last axis (experts) in consecutive bins of ``size``: the mean over the finite
    entries (NaN where none), or for a ``live`` mask whether any expert of the bin is live."""
    if size == 1:
        return a
    pad = -a.shape[-1] % size
    fill = False if live else np.nan
    a = np.concatenate([a, np.full((*a.shape[:-1], pad), fill, dtype=a.dtype)], axis=-1)
    a = a.reshape(*a.shape[:-1], -1, size)
    if live:
        return a.any(axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN bin stays NaN
        return np.nanmean(a, axis=-1)


@dataclass(frozen=True)
class ExpertRows:
    """The experts of all shown sites stacked on one y axis, in bins of ``bin_size`` experts.

    Row ``offsets[site] + expert_id // bin_size`` shows the bin of that expert; ``rates`` and
    ``live`` (S, rows) are on the union of the sites' logged ``steps`` (S,): NaN / False where a
    site has no record, rates NaN where a whole bin is dead.
    """

    steps: np.ndarray
    rates: np.ndarray
    live: np.ndarray
    offsets: dict[str, int]
    sizes: dict[str, int]  # experts (not rows) per site
    bin_size: int

    @property
    def rows(self) -> int:
        return self.rates.shape[1]

    def row(self, site: str, expert_id: int) -> int:
        return self.offsets[site] + expert_id // self.bin_size


def stack_experts(log: ExpertLog, sites: Sequence[str], max_rows: int = MAX_EXPERT_ROWS
                ) -> ExpertRows:
    """Stack the sites' experts on one axis; more than ``max_rows`` experts in all are shown in
    bins of ``ceil(total / max_rows)`` consecutive experts (SPL: hundreds of neurons a site)."""
    steps = np.unique(np.concatenate([log.matrix(s)[0] for s in sites]))
    sizes = {s: log.matrix(s)[1].shape[1] for s in sites}
    bin_size = max(1, int(np.ceil(sum(sizes.values()) / max(1, max_rows))))
    blocks, offsets, row = [], {}, 0
    for site in sites:
        s_steps, rates, live = log.matrix(site)
        idx = np.searchsorted(steps, s_steps)
        full_r = np.full((len(steps), rates.shape[1]), np.nan)
        full_l = np.zeros((len(steps), rates.shape[1]), dtype=bool)
        full_r[idx], full_l[idx] = np.where(live, rates, np.nan), live
        blocks.append((_bin_rows(full_r, bin_size), _bin_rows(full_l, bin_size, live=True)))
        offsets[site] = row
        row += blocks[-1][0].shape[1]
    return ExpertRows(steps, np.concatenate([b[0] for b in blocks], axis=1),
                      np.concatenate([b[1] for b in blocks], axis=1), offsets, sizes, bin_size)


def _site_axis(ax: Axes, data: ExpertRows) -> None:
    """Tick each site's bank with its own expert ids and name the banks on the right."""
    rows, b = data.rows, data.bin_size
    ax.set_ylim(-0.5, rows - 0.5)
    ax.set_ylabel("expert id" if b == 1 else f"expert id (bins of {b} experts: mean)")
    bounds = [*data.offsets.values(), rows]
    ticks, labels = [], []
    for (site, off), end in zip(data.offsets.items(), bounds[1:], strict=True):
        size = end - off
        every = max(1, int(np.ceil(size / max(2, 16 * size // rows))))
        ticks += [off + i for i in range(0, size, every)]
        labels += [str(i * b) for i in range(0, size, every)]
        if len(data.offsets) > 1:
            if off:
                ax.axhline(off - 0.5, color="0.2", linewidth=1.0)
            ax.text(1.01, off + size / 2 - 0.5, site, transform=ax.get_yaxis_transform(),
                    rotation=90, va="center", ha="left", fontsize=9, fontweight="bold")
    ax.set_yticks(ticks, labels, fontsize=8)


def _scatter_panel(fig: Figure, ax: Axes, log: ExpertLog, data: ExpertRows,
                   vmax: float) -> None:
    """One dot per (step, live expert row) chosen at all; size and colour = activation rate;
    lifecycle events as markers labelled ``<kind> (<count>)``."""
    steps, rates, live = _bin_columns(data.steps, data.rates, data.live, _SCATTER_COLUMNS)
    xs, ys = np.meshgrid(steps, np.arange(data.rows), indexing="ij")
    on = live & (np.nan_to_num(rates) > 0)
    # Largest dot about one row / column cell, so dots never merge into a carpet.
    cell = min(_AXES_PT[1] / data.rows, _AXES_PT[0] / len(steps))
    sc = ax.scatter(xs[on], ys[on], s=0.5 + cell**2 * rates[on] / vmax, c=rates[on],
                    cmap="viridis", vmin=0, vmax=vmax, linewidths=0, label="_choices")
    fig.colorbar(sc, ax=ax, label="activation rate", pad=0.06)
    for kind in EVENT_KINDS:
        ev = [e for e in log.events if e.kind == kind and e.site in data.offsets]
        if ev:
            marker, color = _EVENT_STYLE[kind]
            ax.scatter([e.step for e in ev], [data.row(e.site, e.expert_id) for e in ev],
                       marker=marker, s=70, color=color, edgecolors="black", linewidths=0.5,
                       label=f"{kind} ({len(ev)})", zorder=3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3,
                  title="lifecycle events", title_fontsize=8, frameon=False)
    ax.set_xlabel("step")


def _lifetime_panel(ax: Axes, log: ExpertLog, data: ExpertRows, sites: Sequence[str]) -> None:
    """Mean activation rate of each expert (row) over its current lifetime as horizontal bars,
    one colour per site, grey where no expert of the row is live now."""
    for i, site in enumerate(sites):
        mean = _bin_rows(log.lifetime_rates(site), data.bin_size)
        alive = _bin_rows(log.matrix(site)[2][-1], data.bin_size, live=True)
        ax.barh(data.offsets[site] + np.arange(mean.size), np.nan_to_num(mean), height=0.8,
                color=[f"C{i}" if a else _DEAD for a in alive], label=site)
    legend = [Patch(color=f"C{i}", label=site) for i, site in enumerate(sites)]
    ax.legend(handles=legend + [Patch(color=_DEAD, label="dead now")], fontsize=8, loc="best",
              framealpha=0.9)
    ax.set_xlabel("mean activation rate over the expert's current lifetime")
    ax.grid(True, axis="x", alpha=0.3)


def _count_panel(ax: Axes, log: ExpertLog, sites: Sequence[str]) -> None:
    """Experts per site over time: live slots (``<site>: live``) and slots chosen by at least
    one token (``<site>: chosen (>0)``), counted per expert, never per bin."""
    for i, site in enumerate(sites):
        s_steps, s_rates, s_live = log.matrix(site)
        ax.plot(s_steps, s_live.sum(axis=1), color=f"C{i}", linewidth=1.8,
                drawstyle="steps-post", label=f"{site}: live")
        ax.plot(s_steps, (s_live & (np.nan_to_num(s_rates) > 0)).sum(axis=1), color=f"C{i}",
                linestyle="--", linewidth=1.2, drawstyle="steps-post",
                label=f"{site}: chosen (>0)")
    for e in log.events:
        if e.site in sites:
            ax.axvline(e.step, color=_EVENT_STYLE[e.kind][1], alpha=0.25, linewidth=0.8,
                       label="_event")
    ax.set_xlabel("step (vertical lines: lifecycle events)")
    ax.set_ylabel("experts")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", ncol=2 if len(sites) > 2 else 1)


def expert_dashboard_figure(expert_log: ExpertLog, *, sites: Sequence[str] | None = None,
                            title: str = "Expert dashboard",
                            max_rows: int = MAX_EXPERT_ROWS) -> Figure:
    """The 2x2 expert dashboard (seed 002, figure 2) as a Figure.

    Panels (axes labels = titles, ``EXPERT_PANELS``): router-choice scatter (step x expert,
    size and colour = activation rate, lifecycle events marked), lifecycle activation rate (mean
    over each expert's current lifetime, bars), router-choice heatmap (expert x step, grey =
    dead slot) and the expert count over time per site. ``sites`` defaults to all recorded
    sites, stacked on one expert axis (``stack_experts``: binned beyond ``max_rows`` rows).
    """
    sites = list(sites) if sites is not None else expert_log.sites
    sites = [s for s in sites if s in expert_log.sites]
    fig = Figure(figsize=(16, 11), layout="constrained")
    axes = fig.subplots(2, 2).reshape(-1)
    for ax, panel_title in zip(axes, EXPERT_PANELS, strict=True):
        ax.set_label(panel_title)
        ax.set_title(panel_title)
    ax_sc, ax_bar, ax_hm, ax_n = axes
    if not sites:
        fig.suptitle(title, fontsize=14)
        for ax, panel_title in zip(axes, EXPERT_PANELS, strict=True):
            no_data(ax, panel_title, "no data yet: ExpertLog.record() was never called")
        return fig
    data = stack_experts(expert_log, sites, max_rows)
    fig.suptitle(f"{title} (step {int(data.steps[-1])}; sites: {', '.join(sites)})",
                 fontsize=14)
    b_steps, b_rates, _ = _bin_columns(data.steps, data.rates, data.live)
    vmax = float(np.nanmax(b_rates)) if np.isfinite(b_rates).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0

    _scatter_panel(fig, ax_sc, expert_log, data, vmax)
    _lifetime_panel(ax_bar, expert_log, data, sites)
    # Heatmap: pcolormesh copes with unevenly spaced logged steps.
    edges = np.concatenate([[b_steps[0] - 0.5], (b_steps[:-1] + b_steps[1:]) / 2,
                            [b_steps[-1] + 0.5]])
    cmap = colormaps["viridis"].with_extremes(bad=_DEAD)
    mesh = ax_hm.pcolormesh(edges, np.arange(data.rows + 1) - 0.5,
                            np.ma.masked_invalid(b_rates.T), cmap=cmap, vmin=0, vmax=vmax,
                            shading="flat")
    fig.colorbar(mesh, ax=ax_hm, label="activation rate (grey = dead slot)", pad=0.06)
    ax_hm.set_xlabel("step")
    _count_panel(ax_n, expert_log, sites)
    for ax in (ax_sc, ax_bar, ax_hm):
        _site_axis(ax, data)
    for ax in (ax_sc, ax_hm, ax_n):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    return fig
