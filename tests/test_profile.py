"""``tinyonn-train --profile START:STOP``: which steps are traced, the trace files it writes, and
the refusal of bad ranges."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinyonn_jax.errors import UserError
from tinyonn_jax.observe import profile
from tinyonn_jax.observe.profile import StepProfiler, parse_step_range

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"


@pytest.fixture
def calls(monkeypatch):
    """The start_trace / stop_trace calls of the profiler, not run."""
    seen = []
    monkeypatch.setattr(profile.jax.profiler, "start_trace", lambda d: seen.append(("start", d)))
    monkeypatch.setattr(profile.jax.profiler, "stop_trace", lambda: seen.append(("stop",)))
    return seen


def _loop(prof: StepProfiler, first: int, last: int, calls: list) -> list:
    """Steps first..last as the training loop runs them; returns (step, tracing) pairs."""
    traced = []
    for step in range(first, last + 1):
        prof.before_step(step)
        traced.append((step, prof.active))
        prof.after_step(step, None)
    prof.close()
    return traced


def test_traces_start_to_stop_inclusive(tmp_path, calls):
    traced = _loop(StepProfiler(tmp_path, (2, 3)), 1, 5, calls)
    assert [s for s, on in traced if on] == [2, 3]
    assert calls == [("start", str(tmp_path / "profile")), ("stop",)]


def test_resumed_inside_the_range_and_stopped_early(tmp_path, calls):
    traced = _loop(StepProfiler(tmp_path, (2, 10)), 4, 6, calls)  # run ends at step 6
    assert [s for s, on in traced if on] == [4, 5, 6]
    assert calls[-1] == ("stop",) and len(calls) == 2


def test_disabled_off_range_and_other_processes_trace_nothing(tmp_path, calls):
    _loop(StepProfiler(tmp_path, None), 1, 3, calls)
    _loop(StepProfiler(tmp_path, (1, 3), enabled=False), 1, 3, calls)
    _loop(StepProfiler(tmp_path, (7, 9)), 1, 3, calls)
    assert calls == [] and not (tmp_path / "profile").exists()


@pytest.mark.parametrize("text,want", [("1:2", (1, 2)), ("3:3", (3, 3)), (" 2:40", (2, 40))])
def test_parse_step_range(text, want):
    assert parse_step_range(text) == want


@pytest.mark.parametrize("text", ["", "2", "2:1", "0:2", "a:b", "1:2:3", "-1:2"])
def test_parse_step_range_rejects(text):
    with pytest.raises(UserError, match=r"START:STOP.*\(--profile\)"):
        parse_step_range(text)


def test_cli_rejects_bad_profile(capsys, tmp_path):
    from train.main import main

    rc = main(["--config", str(TINY), "--workdir", str(tmp_path / "x"), "--profile", "3:1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--profile" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_run_writes_a_trace(tmp_path):
    from train.main import main

    # test_trainer's micro config: the persistent compilation cache of the test session
    # (conftest) then holds its compiled step.
    sets = ["model.hidden=32", "model.num_heads=2", "model.num_attn_experts=8",
            "model.num_ffn_experts=4", "model.max_refinement_steps=2", "data.max_tasks=4",
            "data.max_len=256", "data.min_bucket=256", "data.batch_size=2", "train.log_every=1",
            "train.plot_every=100", "train.ckpt_every=3", "train.eval_every=0",
            "train.num_steps=3"]
    args = ["--config", str(TINY), "--workdir", str(tmp_path), "--quiet", "--profile", "1:2"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    runs = list((tmp_path / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1  # one trace, started once
    assert [p.stat().st_size > 0 for p in runs[0].glob("*.xplane.pb")] == [True]
