"""Metrics writer, dashboards, ExpertLog and the progress display."""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from tinyonn_jax.observe.dashboards import (
    CORE_METRICS_PNG,
    EXPERT_DASHBOARD_PNG,
    ExpertLog,
    plot_core_metrics,
    plot_expert_dashboard,
)
from tinyonn_jax.observe.progress import Progress
from tinyonn_jax.observe.writer import MetricsWriter, load_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Parse tensorboardX event files (TFRecord framing: len u64, crc u32, data, crc u32)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        buf = f.read_bytes()
        pos = 0
        while pos < len(buf):
            (n,) = struct.unpack("<Q", buf[pos:pos + 8])
            event = event_pb2.Event.FromString(buf[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 10_000 and path.read_bytes()[:8] == PNG_MAGIC


def test_writer_writes_events_jsonl_and_history(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path / "logs") as w:
        w.scalars(0, {"train/main_loss": 2.5, "route/avg_k/attn_q": jnp.float32(3.0)})
        w.scalars(10, {"train/main_loss": np.array([1.25]), "train/tau": float("nan")})
        w.histogram(10, "route/rates/ffn", np.array([0.1, 0.2, 0.7]))
    tb = _tb_scalars(tmp_path / "logs")
    assert tb["train/main_loss"] == [(0, 2.5), (10, 1.25)]
    assert tb["route/avg_k/attn_q"] == [(0, 3.0)]
    lines = [json.loads(x) for x in (tmp_path / "logs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 10]
    assert lines[0]["route/avg_k/attn_q"] == 3.0 and lines[1]["train/main_loss"] == 1.25
    assert lines[1]["train/tau"] is None  # NaN is not JSON
    assert w.history["train/main_loss"] == [(0, 2.5), (10, 1.25)]
    loaded = load_history(tmp_path / "logs/metrics.jsonl")
    assert loaded["train/main_loss"] == [(0, 2.5), (10, 1.25)]
    assert math.isnan(loaded["train/tau"][0][1])


def test_disabled_writer_keeps_history_only(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path / "logs", enabled=False)
    w.scalars(1, {"train/main_loss": 1.0})
    w.close()
    assert w.history == {"train/main_loss": [(1, 1.0)]}
    assert not (tmp_path / "logs").exists()


def test_writer_rejects_arrays_as_scalars(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, enabled=False)
    with pytest.raises(ValueError, match="route/rates"):
        w.scalars(0, {"route/rates": np.ones(3)})


def _history(n: int = 120) -> dict[str, list[tuple[int, float]]]:
    rng = np.random.default_rng(0)
    steps = range(n)
    h = {
        "train/main_loss": [(s, 3.0 / (1 + s / 10) + 0.1 * rng.random()) for s in steps],
        "train/gating_loss": [(s, 1.0 - s / (2 * n)) for s in steps],
        "train/sparsity_loss": [(s, 0.1) for s in steps],
        "train/gating_acc": [(s, 0.5 - s / (4 * n)) for s in steps],
        "train/lambda": [(s, 0.9) for s in steps],
        "train/avg_k": [(s, 3.0) for s in steps],
        "train/main_acc": [(s, s / n) for s in steps],
        "train/pi_score": [(s, 0.5) for s in steps],
        "train/surprise": [(s, 1.0 / (1 + s)) for s in steps],
        "train/tau": [(s, 2.0 - s / n) for s in steps],
        "route/avg_k/attn_q": [(s, 4.0) for s in steps],
        "route/avg_k/ffn": [(s, 2.0) for s in steps],
        "train/num_experts": [(s, 16 + s // 40) for s in steps],
    }
    return h


def test_core_dashboard_full_history(tmp_path: Path) -> None:
    """The PNG writer (what each panel plots: tests/test_dashboards.py)."""
    out = plot_core_metrics(_history(), tmp_path)
    assert out == tmp_path / CORE_METRICS_PNG and _is_png(out)


@pytest.mark.parametrize("keys", [(), ("train/main_loss",), ("train/tau", "route/avg_k/ffn")])
def test_core_dashboard_missing_keys(tmp_path: Path, keys: tuple[str, ...]) -> None:
    h = {k: v for k, v in _history(5).items() if k in keys}
    h["unrelated/metric"] = []  # empty series must not break anything
    assert _is_png(plot_core_metrics(h, tmp_path / "sub" / "core.png"))


def _expert_log() -> ExpertLog:
    rng = np.random.default_rng(1)
    log = ExpertLog(max_records=40)
    live = np.array([True] * 6 + [False] * 2)
    for step in range(0, 100, 2):
        if step == 30:
            live[6] = True
            log.event(step, "add", 6, site="ffn")
        if step == 60:
            live[1] = False
            log.event(step, "remove", 1, site="ffn")
        counts = rng.integers(0, 50, 8) * live
        log.record(step, {"ffn": counts, "attn": rng.integers(0, 50, 12)}, tokens=100,
                   live={"ffn": live.copy()})
    log.event(80, "regenerate", 2, site="ffn")
    log.record(82, {"ffn": np.full(8, 0.5) * live, "attn": np.zeros(12)})
    return log


def test_expert_dashboard_png(tmp_path: Path) -> None:
    out = plot_expert_dashboard(_expert_log(), tmp_path)
    assert out == tmp_path / EXPERT_DASHBOARD_PNG and _is_png(out)
    assert _is_png(plot_expert_dashboard(_expert_log(), tmp_path / "ffn.png", sites=["ffn"]))


def test_expert_dashboard_without_records(tmp_path: Path) -> None:
    assert _is_png(plot_expert_dashboard(ExpertLog(), tmp_path / "empty.png"))


def test_expert_log_records_events_rates_and_lifetimes() -> None:
    log = _expert_log()
    assert [(e.step, e.kind, e.expert_id, e.site) for e in log.events] == [
        (30, "add", 6, "ffn"), (60, "remove", 1, "ffn"), (80, "regenerate", 2, "ffn")]
    assert log.sites == ["ffn", "attn"]
    steps, rates, live = log.matrix("ffn")
    assert rates.shape == live.shape == (len(steps), 8) and len(steps) <= 41
    assert steps[0] == 0 and steps[-1] == 82  # thinning keeps the whole run covered
    assert not live[-1, 1] and live[-1, 6] and not live[-1, 7]
    assert np.all((0 <= rates) & (rates <= 0.5))  # counts / tokens
    lifetime = log.lifetime_rates("ffn")
    assert lifetime[2] == 0.5  # regenerated at 80: only the step-82 record counts
    assert np.isnan(lifetime[7])  # never alive
    with pytest.raises(ValueError, match="kind"):
        log.event(1, "explode", 0)


def test_progress_plain_lines_when_not_a_tty() -> None:
    out = io.StringIO()
    with Progress(100, stream=out, print_every=25) as p:
        for step in range(1, 101):
            p.update(step, {"train/main_loss": 1.0 / step, "train/main_acc": 0.5}, tokens=64)
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["25/100", "50/100", "75/100", "100/100"]
    assert "loss 0.04" in lines[0] and "acc 0.5" in lines[0] and "eta" in lines[0]


def test_progress_disabled_prints_nothing() -> None:
    out = io.StringIO()
    p = Progress(10, enabled=False, stream=out)
    p.update(10, {"train/main_loss": 1.0})
    p.close()
    assert out.getvalue() == ""
