"""tinyonn-eval: restore a checkpoint written with the Checkpointer, evaluate, write the report.

User errors exit with code 2 and one stderr line ``tinyonn-eval: <what> (<field or path>)``;
everything checkable (budget, report path, tasks) is checked before generation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess

import jax
import pytest
from conftest import tiny_model_config

from tinyonn_jax.checkpoint import Checkpointer
from tinyonn_jax.config import Config
from tinyonn_jax.data import tokenizer
from tinyonn_jax.data.tasks import load_tasks
from tinyonn_jax.eval.generate import DEFAULT_MAX_NEW_TOKENS
from tinyonn_jax.families.dyntrm.family import DYNTRM
from train import evaluate as cli


def _task_json(task) -> dict:
    def pairs(ps):
        return [{"input": i.tolist(), "output": o.tolist()} for i, o in ps]

    return {"train": pairs(task.train), "test": pairs(task.test)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir with one checkpoint (step 3) of a tiny model and a directory of 2 real tasks."""
    root = tmp_path_factory.mktemp("evalcli")
    cfg = Config(model=tiny_model_config())
    opt = DYNTRM.build_optimizer(cfg)
    state = DYNTRM.init_state(cfg, opt, jax.random.key(0))
    with Checkpointer(root / "work" / "checkpoints", keep=2) as ckpt:
        ckpt.save(3, state, {"epoch": 0, "index": 0}, cfg.to_dict())
    tasks = load_tasks("arc1", "train")
    small = sorted(tasks, key=lambda t: len(tokenizer.serialize_prompt(t, 0)))[:2]
    data = root / "tasks"
    data.mkdir()
    for t in small:
        (data / f"{t.task_id}.json").write_text(json.dumps(_task_json(t)))
    return root, [t.task_id for t in small]


def _argv(root, out, *extra) -> list[str]:
    """The default generation budget (the smallest one accepted is the largest answer's)."""
    return ["--workdir", str(root / "work"), "--source", str(root / "tasks"), "--split", "train",
            "--views", "2", "--out", str(out), *extra]


def _user_error(capsys, argv) -> str:
    """Run the CLI, expect a user error; returns its one stderr line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyonn-eval: "), lines
    return lines[0]


@pytest.fixture
def no_generation(monkeypatch):
    """Fail the test if the CLI reaches generation."""

    def fail(*args, **kwargs):
        raise AssertionError("tinyonn-eval generated before failing")

    monkeypatch.setattr(cli, "evaluate_tasks", fail)


@contextlib.contextmanager
def _read_only_dir(path):
    """``path`` refuses new entries: mode 0o555, or the immutable flag when running as root."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    try:
        subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot make {path} read-only as root: {e}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def _stray_temp_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_cli_writes_report(run, capsys):
    root, ids = run
    out = root / "report.json"
    rc = cli.main(_argv(root, out))
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"step", "source", "split", "aggregate", "reports", "config"} <= set(report)
    assert report["step"] == 3 and report["aggregate"]["n_tasks"] == 2
    assert {r["task_id"] for r in report["reports"]} == set(ids)
    assert {"task_score", "pair_pass2", "malformed_rate"} <= set(report["aggregate"])
    assert {"pass2", "top1", "n_views", "n_skipped"} <= set(report["reports"][0])
    # The initial halting head never stops early: every view used all refinement steps.
    steps = tiny_model_config().max_refinement_steps
    assert report["aggregate"]["mean_refinement_steps"] == steps
    printed = capsys.readouterr().out
    assert "aggregate" in printed and ids[0] in printed
    assert re.search(rf"mean refinement steps\W+{steps}\.00\b", printed)


def test_bad_workdir_is_a_clear_error(tmp_path, run, capsys):
    root, _ = run
    assert "does not exist" in _user_error(capsys, ["--workdir", str(tmp_path / "nope")])
    assert "no checkpoint directory" in _user_error(capsys, ["--workdir", str(tmp_path)])
    line = _user_error(capsys, ["--workdir", str(root / "work"), "--step", "7"])
    assert "available steps: [3]" in line and str(root / "work" / "checkpoints") in line
    assert "(--views)" in _user_error(capsys, _argv(root, tmp_path / "r.json", "--views", "0"))


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--workdir", str(tmp_path / "nope"), "--debug"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and err[-1].startswith("tinyonn-eval: workdir does")


def test_budget_longer_than_max_len_fails_before_generation(run, tmp_path, capsys,
                                                            no_generation):
    root, _ = run
    line = _user_error(capsys, _argv(root, tmp_path / "r.json", "--max-new-tokens", "5000"))
    assert "model.max_len=4096" in line and "--max-new-tokens=5000" in line
    assert line.endswith("(model.max_len, --max-new-tokens)")
    assert not (tmp_path / "r.json").exists()


def test_budget_below_the_largest_answer_fails_before_generation(run, tmp_path, capsys,
                                                                 no_generation):
    root, _ = run
    low = tokenizer.max_answer_tokens() - 1
    line = _user_error(capsys, _argv(root, tmp_path / "r.json", "--max-new-tokens", str(low)))
    assert f"must be >= {low + 1}" in line and line.endswith("(--max-new-tokens)")
    assert cli.parse_args(["--workdir", "w"]).max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_ttt_flags(run, tmp_path, capsys, no_generation):
    root, _ = run
    args = cli.parse_args(["--workdir", "w"])
    assert (args.ttt_steps, args.ttt_lr) == (0, None)
    args = cli.parse_args(["--workdir", "w", "--ttt-steps", "3", "--ttt-lr", "0.01"])
    assert (args.ttt_steps, args.ttt_lr) == (3, 0.01)
    line = _user_error(capsys, _argv(root, tmp_path / "r.json", "--ttt-steps", "-1"))
    assert "must be >= 0, got -1" in line and line.endswith("(--ttt-steps)")
    line = _user_error(capsys, _argv(root, tmp_path / "r.json", "--ttt-steps", "2",
                                     "--ttt-lr", "0"))
    assert line.endswith("(--ttt-lr)")


def test_cli_with_ttt_reports_seconds_per_task(run, tmp_path, capsys):
    root, ids = run
    out = tmp_path / "report.json"
    argv = _argv(root, out, "--ttt-steps", "2", "--ttt-lr", "0.003", "--max-tasks", "1")
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    agg = report["aggregate"]
    assert report["ttt_steps"] == agg["ttt_steps"] == 2 and report["ttt_lr"] == 0.003
    assert agg["n_tasks"] == 1 and agg["ttt_tasks_untrained"] == 0
    (pair,) = report["reports"]
    assert pair["task_id"] in ids and agg["ttt_seconds_per_task"] == pair["ttt_seconds"] > 0
    assert pair["ttt_demo_loss_before"] > 0 and pair["ttt_demo_loss_after"] > 0
    assert re.search(r"ttt seconds per task\W+\d+\.\d\d\b", capsys.readouterr().out)


def test_unwritable_report_path_fails_before_generation(run, tmp_path, capsys, no_generation):
    root, _ = run
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = _user_error(capsys, _argv(root, blocker / "report.json"))
    assert line.startswith("tinyonn-eval: cannot write the report") and str(blocker) in line
    assert blocker.read_text() == "not a directory"

    as_dir = tmp_path / "dir"
    (as_dir / "inside").mkdir(parents=True)
    line = _user_error(capsys, _argv(root, as_dir))
    assert "is a directory" in line and (as_dir / "inside").is_dir()

    locked = tmp_path / "locked"
    locked.mkdir()
    report = locked / "report.json"
    report.write_text('{"old": true}')
    with _read_only_dir(locked):
        line = _user_error(capsys, _argv(root, report))
    assert "cannot write the report" in line and str(report) in line
    assert report.read_text() == '{"old": true}'


def test_report_is_replaced_atomically(run, tmp_path, capsys, monkeypatch):
    root, _ = run
    out = tmp_path / "report.json"
    out.write_text('{"old": true}')
    inode = out.stat().st_ino
    assert cli.main(_argv(root, out)) == 0
    assert json.loads(out.read_text())["step"] == 3
    assert out.stat().st_ino != inode  # a new file moved over the old one, not rewritten in place
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _stray_temp_files(tmp_path) == []

    out.write_text('{"old": true}')
    replace = os.replace

    def failing_replace(src, dst):
        if os.fspath(dst) == str(out):
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    line = _user_error(capsys, _argv(root, out))
    assert "No space left on device" in line and str(out) in line
    assert out.read_text() == '{"old": true}'
    assert _stray_temp_files(tmp_path) == []


@pytest.mark.filterwarnings("ignore:skipped 1 bad task file")
def test_no_scorable_task_fails_and_keeps_the_report(run, tmp_path, capsys, no_generation):
    root, _ = run
    out = tmp_path / "report.json"
    out.write_text('{"old": true}')
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.json").write_text('{"x": 1}')  # skipped at load: 0 tasks
    line = _user_error(capsys, [*_argv(root, out), "--source", str(bad)])
    assert "no tasks to evaluate" in line and str(bad) in line
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "h.json").write_text(json.dumps(
        {"train": [{"input": [[1]], "output": [[2]]}], "test": [{"input": [[1]]}]}))
    line = _user_error(capsys, [*_argv(root, out), "--source", str(hidden)])
    assert "known answer" in line and str(hidden) in line
    assert out.read_text() == '{"old": true}'


def test_print_config(run, capsys, no_generation):
    root, _ = run
    assert cli.main(["--workdir", str(root / "work"), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(Config(model=tiny_model_config()).to_dict()))
    assert not list((root / "work").glob("eval_step*.json"))


def test_cli_warns_when_an_evaluated_test_pair_is_trained_on(run, tmp_path, capsys,
                                                             no_generation):
    """The checkpoint's config trains on ARC-AGI-1 training tasks; evaluating two of them says so
    before generating."""
    root, _ = run
    with pytest.raises(AssertionError, match="generated"):
        cli.main(_argv(root, tmp_path / "r.json"))
    out = capsys.readouterr().out
    assert re.search(r"tinyonn-eval: warning: .*2 of 2", out), out
