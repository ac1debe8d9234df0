"""The seed-002 dashboards plot exactly the listed series: read back from the figures' artists
(titles, line labels and data, scatter offsets, bar widths, heatmap arrays) for known inputs,
and for one real step of every family. The one PI formula is the one in README.md and on the
dashboard."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_FAMILY_CONFIGS, tiny_batch
from matplotlib.collections import PathCollection, QuadMesh

from tinyonn_jax import metrics
from tinyonn_jax.families.registry import get_family
from tinyonn_jax.metrics import PI_FORMULA, SEED002_METRICS
from tinyonn_jax.observe.core_dashboard import CORE_PANELS, core_metrics_figure
from tinyonn_jax.observe.expert_dashboard import (
    EXPERT_PANELS,
    MAX_EXPERT_ROWS,
    expert_dashboard_figure,
)
from tinyonn_jax.observe.expert_log import ExpertLog

ROOT = Path(__file__).resolve().parents[1]
SEED002_CORE = ("Loss", "Accuracy", "PI Score", "Surprise & Tau", "DynNSA Dynamics",
                "Expert Dynamics")
NOT_DEFINED = "{}: not defined for this family"


# --- helpers reading a figure back ------------------------------------------------------------

def _axes(fig) -> dict[str, object]:
    """Axes by label: a panel's title, or ``"<title> (right)"`` for its twin axis."""
    return {ax.get_label(): ax for ax in fig.axes if ax.get_label()}


def _lines(ax) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {ln.get_label(): (np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float))
            for ln in ax.get_lines()}


def _panel_lines(fig, title: str) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """Every curve of a core panel: label -> (x, y, "left" | "right")."""
    axes = _axes(fig)
    out = {k: (*v, "left") for k, v in _lines(axes[title]).items()}
    if f"{title} (right)" in axes:
        out |= {k: (*v, "right") for k, v in _lines(axes[f"{title} (right)"]).items()}
    return out


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _ema(values: list[float], span: float) -> np.ndarray:
    """The EMA the dashboard documents, written out: acc += 2 / (span + 1) * (v - acc)."""
    a, acc, out = 2.0 / (span + 1.0), None, []
    for v in values:
        acc = v if acc is None else acc + a * (v - acc)
        out.append(acc)
    return np.array(out)


# --- the PI formula ---------------------------------------------------------------------------

def test_pi_score_is_the_seed002_formula():
    rng = np.random.default_rng(0)
    loss, tau, s = rng.uniform(0.1, 3.0, (3, 64)).astype(np.float32)
    for alpha, gamma in [(1.0, 0.5), (0.3, 0.0), (2.0, 1.0)]:
        got = metrics.pi_score(jnp.asarray(loss), jnp.asarray(tau), jnp.asarray(s), alpha, gamma)
        want = np.exp(-alpha * (loss.astype(np.float64) / tau + gamma * s))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    # tau -> 0 (a fully confident model) is floored, not a division by zero
    zero = metrics.pi_score(jnp.float32(0.0), jnp.float32(0.0), jnp.float32(0.0), 1.0, 0.5)
    assert float(zero) == 1.0


def test_readme_writes_the_pi_formula_and_every_contract_metric():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^### Metrics\n(.*?)(?=^#)", readme, flags=re.S | re.M)
    assert section, "README.md has no '### Metrics' subsection"
    text = section.group(1)
    assert PI_FORMULA in text
    for name in SEED002_METRICS:
        assert f"`{name}`" in text, name


# --- the core-metrics dashboard ---------------------------------------------------------------

def test_core_panels_are_seed002s_six_with_every_contract_metric_once():
    assert tuple(p.title for p in CORE_PANELS) == SEED002_CORE
    names = [s.name for p in CORE_PANELS for s in p.series if "*" not in s.name]
    assert sorted(names) == sorted(SEED002_METRICS)  # each once, nothing else but patterns
    fig = core_metrics_figure({"train/pi_score": [(1, 0.5)]})
    assert [ax.get_title() for ax in fig.axes[:6]] == list(SEED002_CORE)
    assert PI_FORMULA in _texts(_axes(fig)["PI Score"])


def _full_history(n: int) -> dict[str, list[tuple[int, float]]]:
    """Every contract metric with its own values, per-site avg_k, and look-alikes that no panel
    may show."""
    steps = np.arange(2, 2 + 3 * n, 3)  # uneven steps: x data must be the logged steps
    h = {name: [(int(s), float(np.sin(s * (i + 1)) + 2 * i)) for s in steps]
         for i, name in enumerate(sorted(SEED002_METRICS))}
    h["route/avg_k/attn"] = [(int(s), 1.5 + 0.01 * s) for s in steps]
    h["route/avg_k/ffn"] = [(int(s), 2.5 - 0.01 * s) for s in steps]
    for lookalike in ("train/loss", "eval/main_loss", "train/token_acc", "sars/pi_score",
                      "sars/surprise", "experts/num_experts", "gate/lambda", "train/meta_loss"):
        h[lookalike] = [(int(s), -7.0) for s in steps]
    return h


EXPECTED = {  # panel -> {curve label: (metric, axis)}
    "Loss": {"main_loss": ("train/main_loss", "left"),
             "gating_loss": ("train/gating_loss", "left"),
             "sparsity_loss": ("train/sparsity_loss", "left")},
    "Accuracy": {"main_acc": ("train/main_acc", "left"),
                 "gating_acc": ("train/gating_acc", "left")},
    "PI Score": {"pi_score": ("train/pi_score", "left"),
                 "lambda(PI)": ("train/lambda", "right")},
    "Surprise & Tau": {"surprise": ("train/surprise", "left"), "tau": ("train/tau", "right")},
    "DynNSA Dynamics": {"avg_k": ("train/avg_k", "left"),
                        "avg_k/attn": ("route/avg_k/attn", "left"),
                        "avg_k/ffn": ("route/avg_k/ffn", "left")},
    "Expert Dynamics": {"num_experts": ("train/num_experts", "left")},
}


def test_core_figure_plots_exactly_the_listed_series_and_their_values():
    h = _full_history(12)  # <= 30 points: raw curves
    fig = core_metrics_figure(h)
    for title, expected in EXPECTED.items():
        got = _panel_lines(fig, title)
        assert set(got) == set(expected), title
        for label, (name, side) in expected.items():
            x, y, axis = got[label]
            assert axis == side, (title, label)
            np.testing.assert_array_equal(x, [s for s, _ in h[name]])
            np.testing.assert_array_equal(y, [v for _, v in h[name]])
        assert not any("not defined" in t for t in _texts(_axes(fig)[title])), title


def test_core_figure_smooths_noisy_curves_with_the_ema_but_not_counters():
    n = 50
    h = _full_history(n)
    fig = core_metrics_figure(h)
    loss = _panel_lines(fig, "Loss")
    raw = [v for _, v in h["train/main_loss"]]
    np.testing.assert_array_equal(loss["_raw main_loss"][1], raw)
    np.testing.assert_allclose(loss["main_loss (EMA)"][1], _ema(raw, n / 20), rtol=1e-12)
    tau = _panel_lines(fig, "Surprise & Tau")["tau (EMA)"]
    assert tau[2] == "right"
    np.testing.assert_allclose(tau[1], _ema([v for _, v in h["train/tau"]], n / 20), rtol=1e-12)
    count = _panel_lines(fig, "Expert Dynamics")
    assert set(count) == {"num_experts"}
    np.testing.assert_array_equal(count["num_experts"][1], [v for _, v in h["train/num_experts"]])


def test_core_figure_says_which_metric_a_family_does_not_define():
    h = _full_history(5)
    for name in ("train/sparsity_loss", "train/lambda", "train/num_experts", "route/avg_k/attn",
                 "route/avg_k/ffn", "train/gating_acc"):
        del h[name]
    fig = core_metrics_figure(h)
    axes = _axes(fig)
    assert set(_panel_lines(fig, "Loss")) == {"main_loss", "gating_loss"}
    assert NOT_DEFINED.format("sparsity_loss") in _texts(axes["Loss"])
    assert NOT_DEFINED.format("gating_acc") in _texts(axes["Accuracy"])
    # lambda exists only where the family has it: no twin axis, no note
    assert set(_panel_lines(fig, "PI Score")) == {"pi_score"}
    assert "PI Score (right)" not in axes
    assert not any("lambda" in t for t in _texts(axes["PI Score"]))
    assert set(_panel_lines(fig, "DynNSA Dynamics")) == {"avg_k"}
    assert _panel_lines(fig, "Expert Dynamics") == {}
    assert NOT_DEFINED.format("num_experts") in _texts(axes["Expert Dynamics"])


def test_core_figure_without_any_data_says_so_on_every_panel():
    fig = core_metrics_figure({"train/main_loss": []})
    for title in SEED002_CORE:
        ax = _axes(fig)[title]
        assert ax.get_title() == title and ax.get_lines() == []
        assert _texts(ax) == ["no data yet"]


# --- the expert dashboard ---------------------------------------------------------------------

ATTN = np.array([[0.5, 0.0, 0.25], [0.4, 0.1, 0.0], [0.3, 0.3, 0.3], [0.0, 0.0, 0.9],
                 [0.2, 0.6, 0.1]])  # (S, 3), always live
STEPS = [1, 2, 4, 7, 8]


def _ffn_rates(i: int) -> np.ndarray:
    return np.array([0.1 * (i + 1), 0.2, 0.0, 0.3])


def _known_log() -> tuple[ExpertLog, np.ndarray, list[tuple[int, str, int]]]:
    """Two sites; ffn slot 3 is added after step 2, slot 0 regenerated after step 4, slot 1
    removed after step 7 (events follow the step's record, as in the trainer)."""
    log, live = ExpertLog(), np.array([True, True, True, False])
    lives, events = [], [(2, "add", 3), (4, "regenerate", 0), (7, "remove", 1)]
    for i, step in enumerate(STEPS):
        log.record(step, {"attn": ATTN[i], "ffn": _ffn_rates(i) * live}, live={"ffn": live})
        lives.append(live.copy())
        for ev_step, kind, expert in events:
            if ev_step == step:
                log.event(step, kind, expert, site="ffn")
                live[expert] = kind != "remove"
    return log, np.array(lives), events


def _lifetime_means(rates: np.ndarray, live: np.ndarray, resets: dict[int, int]) -> np.ndarray:
    """Mean over the live records after each expert's last add / regenerate."""
    out = np.full(rates.shape[1], np.nan)
    for e in range(rates.shape[1]):
        keep = [i for i, s in enumerate(STEPS) if live[i, e] and s > resets.get(e, -1)]
        if keep:
            out[e] = rates[keep, e].mean()
    return out


def test_expert_figure_panels_read_back_the_known_log():
    log, ffn_live, events = _known_log()
    ffn = np.stack([_ffn_rates(i) for i in range(len(STEPS))]) * ffn_live
    fig = expert_dashboard_figure(log)
    axes = _axes(fig)
    assert [axes[t].get_title() for t in EXPERT_PANELS] == list(EXPERT_PANELS)
    rates = np.concatenate([ATTN, ffn], axis=1)  # rows: attn 0-2, ffn 3-6
    live = np.concatenate([np.ones_like(ATTN, bool), ffn_live], axis=1)

    # Scatter: one dot per (step, live expert chosen at all), colour = its rate.
    sc = [c for c in axes["Router Choice Scatter"].collections if isinstance(c, PathCollection)]
    dots = next(c for c in sc if c.get_label() == "_choices")
    on = live & (rates > 0)
    want = [(STEPS[i], r) for i in range(len(STEPS)) for r in range(7) if on[i, r]]
    np.testing.assert_array_equal(dots.get_offsets(), want)
    np.testing.assert_allclose(dots.get_array(), rates[on])
    marks = {c.get_label(): c.get_offsets().tolist() for c in sc if c is not dots}
    assert marks == {f"{k} (1)": [[s, 3 + e]] for s, k, e in events}

    # Lifecycle bars: mean over each expert's current lifetime; grey where dead now.
    bars = {c.get_label(): c for c in axes["Lifecycle Activation Rate"].containers}
    assert set(bars) == {"attn", "ffn"}
    np.testing.assert_allclose([b.get_width() for b in bars["attn"]], ATTN.mean(0))
    want_ffn = _lifetime_means(ffn, ffn_live, {3: 2, 0: 4})
    np.testing.assert_allclose([b.get_width() for b in bars["ffn"]], want_ffn)
    np.testing.assert_allclose([b.get_y() + b.get_height() / 2 for b in bars["ffn"]],
                               [3, 4, 5, 6])
    grey = [b.get_facecolor()[:3] == (0.75, 0.75, 0.75) for b in bars["ffn"]]
    assert grey == [False, True, False, False]

    # Heatmap: expert rows x logged steps, masked where the slot is dead.
    (mesh,) = [c for c in axes["Router Choice Heatmap"].collections if isinstance(c, QuadMesh)]
    arr = mesh.get_array()
    assert arr.shape == (7, len(STEPS))
    np.testing.assert_array_equal(np.ma.getmaskarray(arr), ~live.T)
    np.testing.assert_allclose(arr.filled(np.nan)[live.T], rates.T[live.T])

    # Expert count: live slots and slots chosen by some token, per site and logged step.
    lines = _lines(axes["Expert Count"])
    assert {k for k in lines if not k.startswith("_")} == {
        "attn: live", "attn: chosen (>0)", "ffn: live", "ffn: chosen (>0)"}
    np.testing.assert_array_equal(lines["ffn: live"][0], STEPS)
    np.testing.assert_array_equal(lines["ffn: live"][1], ffn_live.sum(1))
    np.testing.assert_array_equal(lines["ffn: chosen (>0)"][1], ((ffn > 0) & ffn_live).sum(1))
    np.testing.assert_array_equal(lines["attn: chosen (>0)"][1], (ATTN > 0).sum(1))


def test_expert_figure_bins_many_neurons_by_mean_and_counts_every_neuron():
    rng = np.random.default_rng(3)
    n, steps = 300, [5, 10, 15]  # one SPL-like site of 300 neurons -> bins of 3 (100 rows)
    rates = rng.uniform(0.0, 1.0, (len(steps), n)) * (rng.random((len(steps), n)) < 0.7)
    live = np.ones(n, bool)
    live[[0, 1, 2, 7]] = False  # bin 0 dead, bin 2 has two live neurons
    log = ExpertLog()
    for s, r in zip(steps, rates, strict=True):
        log.record(s, {"mlp": r}, live={"mlp": live})
    fig = expert_dashboard_figure(log, max_rows=128)
    axes = _axes(fig)
    shown = np.where(live, rates, np.nan).reshape(len(steps), n // 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the dead bin: mean of nothing
        want = np.nanmean(shown, axis=-1)  # (S, 100), NaN for the dead bin
    (mesh,) = [c for c in axes["Router Choice Heatmap"].collections if isinstance(c, QuadMesh)]
    arr = mesh.get_array()
    assert arr.shape == (n // 3, len(steps)) and arr.mask[0].all() and not arr.mask[1:].any()
    np.testing.assert_allclose(arr.filled(np.nan)[1:], want.T[1:], rtol=1e-12)
    (bars,) = axes["Lifecycle Activation Rate"].containers
    np.testing.assert_allclose([b.get_width() for b in bars][1:],
                               np.nanmean(want[:, 1:], axis=0), rtol=1e-12)
    assert axes["Router Choice Heatmap"].get_ylabel() == "expert id (bins of 3 experts: mean)"
    ticks = [int(t.get_text()) for t in axes["Router Choice Heatmap"].get_yticklabels()]
    assert ticks and all(t % 3 == 0 and t < n for t in ticks)
    lines = _lines(axes["Expert Count"])
    np.testing.assert_array_equal(lines["mlp: live"][1], [n - 4] * 3)
    np.testing.assert_array_equal(lines["mlp: chosen (>0)"][1], ((rates > 0) & live).sum(1))


def test_expert_figure_without_records_says_so():
    fig = expert_dashboard_figure(ExpertLog())
    for title in EXPERT_PANELS:
        ax = _axes(fig)[title]
        assert ax.get_title() == title and not ax.get_lines() and not ax.collections
        assert any("no data yet" in t for t in _texts(ax))


# --- one real step of every family ------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY_FAMILY_CONFIGS))
def test_every_family_step_metrics_fill_both_dashboards(name):
    """Two real steps: every contract metric a family emits is drawn with its values, every
    one it lacks is named on its panel; its expert rows fill the expert dashboard."""
    cfg = TINY_FAMILY_CONFIGS[name]
    family = get_family(cfg)
    opt = family.build_optimizer(cfg)
    state = family.init_state(cfg, opt, jax.random.key(0))
    step = family.make_train_step(cfg, opt, donate=False)
    history: dict[str, list[tuple[int, float]]] = {}
    log = ExpertLog()
    for i in (1, 2):
        state, m = step(state, tiny_batch(cfg))
        m = jax.device_get(m)
        for k, v in m.items():
            if np.ndim(v) == 0:
                history.setdefault(k, []).append((i, float(v)))
        usage, live = family.expert_rows({k: v for k, v in m.items() if np.ndim(v) > 0})
        if usage:
            log.record(i, usage, live=live)
    fig = core_metrics_figure(history)
    for title, expected in EXPECTED.items():
        got = _panel_lines(fig, title)
        texts = _texts(_axes(fig)[title])
        for label, (metric, _) in expected.items():
            if metric in history:
                np.testing.assert_array_equal(got[label][1], [v for _, v in history[metric]])
            else:
                assert label not in got
                optional = metric in ("train/lambda",) or metric.startswith("route/avg_k/")
                assert optional or any(NOT_DEFINED.format(label) in t for t in texts), (
                    title, label)
    assert log.sites, f"{name}: expert_rows gave no dashboard rows"
    fig = expert_dashboard_figure(log)
    (mesh,) = [c for c in _axes(fig)["Router Choice Heatmap"].collections
               if isinstance(c, QuadMesh)]
    sizes = [log.matrix(s)[1].shape[1] for s in log.sites]
    per_bin = -(-sum(sizes) // MAX_EXPERT_ROWS)  # ceil: 1 unless the family has many experts
    assert mesh.get_array().shape[0] == sum(-(-p // per_bin) for p in sizes) <= MAX_EXPERT_ROWS
    lines = _lines(_axes(fig)["Expert Count"])
    for site in log.sites:
        steps, _, site_live = log.matrix(site)
        np.testing.assert_array_equal(lines[f"{site}: live"][1], site_live.sum(1))
