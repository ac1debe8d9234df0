"""Nothing silently wrong, nothing lost: config parsing, non-finite states, signals, the workdir
lock, resume hygiene, user errors of the training program (one test per failure mode)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import chex
import jax
import numpy as np
import optax
import pytest
from test_trainer import ROOT, TINY, _micro_cfg

from tinyonn_jax import optim, trainer
from tinyonn_jax.checkpoint import Checkpointer
from tinyonn_jax.config import Config, ModelConfig, OptimizerConfig, apply_overrides
from tinyonn_jax.errors import ConfigError, UserError
from tinyonn_jax.families.registry import get_family
from tinyonn_jax.interrupts import GracefulStop
from tinyonn_jax.observe.progress import Progress
from tinyonn_jax.workdir import WorkdirLock
from train.main import main as train_main

MICRO = ["model.hidden=32", "model.num_heads=2", "model.num_attn_experts=8",
         "model.num_ffn_experts=4", "model.max_refinement_steps=2", "data.max_tasks=4",
         "data.max_len=256", "data.min_bucket=256", "data.batch_size=2", "train.eval_every=0",
         "train.plot_every=1000"]


def _cli(tmp_path, *extra, workdir=None, config=TINY):
    """Arguments of a micro tinyonn-train run."""
    args = ["--config", str(config), "--workdir", str(workdir or tmp_path / "run"), "--quiet"]
    for item in MICRO:
        args += ["--set", item]
    return args + list(extra)


def _jsonl_steps(path: Path) -> list[int]:
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()]


def _events(logdir: Path):
    """Every TensorBoard event in ``logdir`` (TFRecord framing read by hand)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            out.append((path.name, ev))
            i += 12 + n + 4
    return out


# 1. --set values are parsed by the field's declared type ------------------------------------

@pytest.mark.parametrize("text,value", [("false", False), ("False", False), ("0", False),
                                        ("no", False), ("NO", False), ("off", False),
                                        ("true", True), ("1", True), ("Yes", True)])
def test_set_parses_bools_by_declared_type(text, value):
    for path in ("model.use_ffn", "sars.enabled", "data.augment"):
        cfg = apply_overrides(Config(), [f"{path}={text}"])
        section, key = path.split(".")
        assert getattr(getattr(cfg, section), key) is value


def test_set_parses_numbers_strings_and_tuples():
    cfg = apply_overrides(Config(), [
        "model.hidden=64", "model.num_heads=4", "optim.learning_rate=3e-4", "optim.name=lion",
        "train.deep_supervision=(1, 0.5)", "meta_optim.kwargs={'weight_decay': 0.1}",
        "data.source='arc2'", "family=dynonn", "model.regenerate=yes"])
    assert cfg.optim.learning_rate == 3e-4 and cfg.family == "dynonn"
    assert cfg.optim.name == "lion" and cfg.data.source == "arc2" and cfg.model.regenerate is True
    assert apply_overrides(Config(), ["model.hidden=64"]).model.hidden == 64
    assert cfg.train.deep_supervision == (1, 0.5)
    assert cfg.meta_optim.kwargs == (("weight_decay", 0.1),)
    assert apply_overrides(Config(), ["train.deep_supervision=1,0.5"]).train.deep_supervision \
        == (1, 0.5)


@pytest.mark.parametrize("item,named,accepted", [
    ("model.use_ffn=maybe", "model.use_ffn", "true/false"),
    ("sars.enabled=2", "sars.enabled", "yes/no"),
    ("train.seed=1.5", "train.seed", "integer"),
    ("model.hidden=64.0", "model.hidden", "integer"),
    ("optim.learning_rate=abc", "optim.learning_rate", "number"),
    ("optim.learning_rate=1e999", "optim.learning_rate", "finite"),
    ("optim.learning_rate=nan", "optim.learning_rate", "finite"),
    ("train.deep_supervision=(1, x", "train.deep_supervision", "tuple"),
])
def test_set_rejects_values_of_another_type_naming_the_field(item, named, accepted):
    with pytest.raises(ConfigError, match=named) as e:
        apply_overrides(Config(), [item])
    assert accepted in str(e.value)


def test_use_ffn_false_on_the_command_line_builds_no_ffn(tmp_path, capsys):
    rc = train_main(_cli(tmp_path, "--set", "model.use_ffn=false", "--set", "data.augment=no",
                         "--print-config"))
    printed = json.loads(capsys.readouterr().out)
    assert rc == 0 and printed["model"]["use_ffn"] is False and printed["data"]["augment"] is False
    cfg = apply_overrides(_micro_cfg(), ["model.use_ffn=false"])
    assert "ffn" not in cfg.model.routed_sites
    assert get_family(cfg).num_experts(cfg) == cfg.model.num_attn_experts
    params = jax.eval_shape(lambda k: get_family(cfg).init_params(k, cfg), jax.random.key(0))
    assert "ffn" not in params["block"] and "moe" not in params["block"]


# 2. no non-finite state is kept or saved ------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(learning_rate=float("inf")),
                                dict(learning_rate=float("nan")),
                                dict(clip_norm=float("inf")),
                                dict(kwargs=(("weight_decay", float("nan")),))])
def test_config_rejects_non_finite_floats(kw):
    with pytest.raises(ConfigError, match="finite"):
        OptimizerConfig(**kw)
    with pytest.raises(ConfigError, match="init_std"):
        ModelConfig(init_std=float("nan"))


SMALL_MODEL = {"tiny": ["model.hidden=32", "model.num_heads=2"],
               "tiny_spl": ["model.hidden=32", "model.num_layers=2"],
               "tiny_dynonn": ["model.hidden=32", "model.num_layers=1"]}


@pytest.mark.parametrize("name", sorted(SMALL_MODEL))
def test_an_overflowing_update_is_skipped_and_the_state_kept(name):
    """A finite loss whose update overflows (learning rate 1e38) keeps params and opt state."""
    cfg = apply_overrides(trainer.load_config(ROOT / "configs" / f"{name}.py"),
                          ["data.max_tasks=2", "data.max_len=256", "data.min_bucket=256",
                           "data.batch_size=1", *SMALL_MODEL[name]])
    family = get_family(cfg)
    huge = optax.sgd(1e38)
    state = family.init_state(cfg, huge, jax.random.key(0))
    tasks, _, _ = trainer.select_tasks(cfg)
    batch, _ = trainer.DataFeed(tasks, cfg).next(0)
    new, metrics = jax.jit(lambda s, b: family.train_step(s, b, cfg=cfg, optimizer=huge))(
        state, {k: np.asarray(v) for k, v in batch.items()})
    assert np.isfinite(float(metrics["train/main_loss"]))
    assert float(metrics["train/update_ok"]) == 0.0 and int(new.skipped) == 1
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.opt_state, state.opt_state)
    chex.assert_trees_all_equal(*(jax.tree.map(_key_data, s.extras) for s in (new, state)))


def _key_data(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def test_a_non_finite_state_is_never_saved(tmp_path):
    cfg = _micro_cfg()
    family = get_family(cfg)
    opt = family.build_optimizer(cfg)
    state = family.init_state(cfg, opt, jax.random.key(0))
    bad = state._replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        trainer._save(ckpt, 1, state, {}, cfg)
        ckpt.wait_until_finished()
        with pytest.raises(UserError, match="inf or NaN"):
            trainer._save(ckpt, 2, bad, {}, cfg)
        assert ckpt.all_steps() == [1]


# 5. SIGINT / SIGTERM save a checkpoint and exit 130 / 143; a second signal exits at once -----

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_save_a_checkpoint_and_exit(tmp_path, sig):
    wd = tmp_path / "run"
    args = [sys.executable, "-m", "train.main"] + _cli(
        tmp_path, "--set", "train.num_steps=100000", "--set", "train.ckpt_every=1000",
        "--set", "train.log_every=1", workdir=wd)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = wd / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and
                                          len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err and "checkpoint saved" in err
    steps = sorted(int(p.name) for p in (wd / "checkpoints").glob("*") if p.name.isdigit())
    assert steps and steps[-1] >= 2, err  # not a multiple of ckpt_every: saved on the signal
    with Checkpointer(wd / "checkpoints", read_only=True) as c:
        assert c.latest_step() == steps[-1]


def test_a_second_signal_exits_at_once(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with GracefulStop() as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle
        os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread, between bytecodes
        assert stop.requested == signal.SIGINT and exits == []
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [130]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "second SIGINT: exiting now without saving" in capsys.readouterr().err


# 6. one run per workdir ----------------------------------------------------------------------

def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path, capsys):
    wd = tmp_path / "run"
    wd.mkdir()
    with WorkdirLock(wd):
        with pytest.raises(UserError, match=f"PID {os.getpid()}"):
            trainer.run(_micro_cfg(**{"train.num_steps": 1}), wd, quiet=True)
        assert train_main(_cli(tmp_path, workdir=wd)) == 2
        assert f"in use by another run (PID {os.getpid()})" in capsys.readouterr().err
    assert not (wd / "checkpoints").exists()
    with WorkdirLock(wd):  # free again once the holder released it
        pass


# 7, 8, 14. resume: logs rewound, unreadable checkpoints skipped, every case said -------------

FOUR_STEPS = {"train.eval_every": 0}


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
    """A finished 4-step run with checkpoints 2 and 4 and metrics of steps 1-4."""
    wd = tmp_path_factory.mktemp("four") / "run"
    trainer.run(_micro_cfg(**FOUR_STEPS), wd, quiet=True)
    return wd


def _four_steps(source: Path, wd: Path):
    """A copy of the 4-step run in ``wd`` and its config."""
    shutil.copytree(source, wd)
    (wd / ".lock").unlink(missing_ok=True)
    return _micro_cfg(**FOUR_STEPS)


def test_resume_rewinds_metrics_and_tensorboard_to_the_restored_step(tmp_path, four_step_run):
    wd = tmp_path / "run"
    cfg = _four_steps(four_step_run, wd)
    shutil.rmtree(wd / "checkpoints" / "4")  # killed after logging step 4, before its checkpoint
    assert _jsonl_steps(wd / "logs" / "metrics.jsonl") == [1, 2, 3, 4]
    trainer.run(cfg, wd, resume=True, quiet=True)
    assert _jsonl_steps(wd / "logs" / "metrics.jsonl") == [1, 2, 3, 4]
    purges = [ev.step for _, ev in _events(wd / "logs")
              if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START]
    assert purges == [3]  # TensorBoard hides the first run's events of steps >= 3


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, capsys, four_step_run):
    wd = tmp_path / "run"
    cfg = _four_steps(four_step_run, wd)
    for f in (wd / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    out = trainer.run(apply_overrides(cfg, ["train.num_steps=6"]), wd, resume=True, quiet=True)
    err = capsys.readouterr().err
    assert "checkpoint step 4 cannot be restored" in err and "resuming from checkpoint step 2" \
        in err
    assert len(err) < 2000
    assert (wd / trainer.UNREADABLE_DIR / "4").is_dir()
    assert np.isfinite(out["train/main_loss"])
    with Checkpointer(wd / "checkpoints", read_only=True) as c:
        assert c.all_steps()[-1] == 6 and 4 in c.all_steps()  # step 4 saved anew


def test_resume_with_no_readable_checkpoint_is_one_line(tmp_path, capsys, four_step_run):
    wd = tmp_path / "run"
    _four_steps(four_step_run, wd)
    for f in (wd / "checkpoints").rglob("*"):
        if f.is_file() and "state" in f.parts:
            f.write_bytes(b"x")
    assert train_main(_cli(tmp_path, "--resume", "--set", "train.num_steps=6",
                           workdir=wd)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint" in err[0] and "can be restored" in err[0]


def test_resume_refuses_another_model_or_family(tmp_path, four_step_run):
    wd = tmp_path / "run"
    cfg = apply_overrides(_four_steps(four_step_run, wd), ["train.num_steps=6"])
    for other, changed in ((["model.hidden=64"], "model.hidden"),
                           (["family=spl", "model.hidden=32", "model.num_layers=1"], "family")):
        with pytest.raises(UserError, match="different model config") as e:
            trainer.run(apply_overrides(cfg, other), wd, resume=True, quiet=True)
        assert changed in str(e.value)
    with Checkpointer(wd / "checkpoints", read_only=True) as c:
        assert c.all_steps() == [2, 4]  # nothing lost


def test_resume_says_what_it_does(tmp_path, capsys):
    # missing workdir: warn and start fresh
    wd = tmp_path / "fresh"
    trainer.run(_micro_cfg(**{"train.num_steps": 2}), wd, resume=True, quiet=True)
    assert "no checkpoint" in capsys.readouterr().err
    # num_steps below the checkpoint: refused
    with pytest.raises(UserError, match="beyond train.num_steps=1"):
        trainer.run(_micro_cfg(**{"train.num_steps": 1}), wd, resume=True, quiet=True)
    # num_steps equal to the checkpoint: nothing to train, said so
    out = trainer.run(_micro_cfg(**{"train.num_steps": 2}), wd, resume=True, quiet=True)
    assert out == {"train/final_step": 2} and "nothing to train" in capsys.readouterr().err
    # a changed data source: warned, the data stream restarts
    other = _micro_cfg(**{"train.num_steps": 3, "data.source": "arc1-2019"})
    trainer.run(other, wd, resume=True, quiet=True)
    err = capsys.readouterr().err
    assert "data.source" in err and "starts again" in err


# 10. every update skipped: a warning, then a stop ---------------------------------------------

def test_a_run_whose_updates_are_all_skipped_warns_then_stops(tmp_path, capsys):
    wd = tmp_path / "run"
    rc = train_main(_cli(tmp_path, "--set", "optim.name=sgd", "--set", "optim.kwargs=()",
                         "--set", "optim.learning_rate=3e38", "--set", "train.num_steps=50",
                         "--set", "train.warn_after_skips=2", "--set", "train.stop_after_skips=4",
                         "--set", "train.ckpt_every=1", workdir=wd))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "warning: 2 consecutive updates skipped" in err
    assert "stopping: 4 consecutive updates skipped" in err
    with Checkpointer(wd / "checkpoints", read_only=True) as c:
        last = c.latest_step()
    assert last is not None and last < 50
    state = trainer.restore_train_state(wd, step=last)[0]
    assert bool(optim.all_finite(state.params)) and bool(optim.all_finite(state.opt_state))


# 12, 9. user errors: one line, exit code 2, no traceback ---------------------------------------

def _bad_config_file(tmp_path):
    path = tmp_path / "raises.py"
    path.write_text("def get_config():\n    raise RuntimeError('boom')\n")
    return path


@pytest.mark.parametrize("case", ["empty_data", "config_raises", "seed_float", "optim_foo",
                                  "workdir_not_dir", "disk_full", "vocab_small", "bad_key"])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch, case):
    extra, config, workdir, expect = [], TINY, None, None
    if case == "empty_data":
        (tmp_path / "empty").mkdir()
        extra, expect = ["--set", f"data.source={tmp_path / 'empty'}"], "cannot load tasks"
    elif case == "config_raises":
        config, expect = _bad_config_file(tmp_path), "config file raised RuntimeError: boom"
    elif case == "seed_float":
        extra, expect = ["--set", "train.seed=1.5"], "train.seed"
    elif case == "optim_foo":
        extra, expect = ["--set", "optim.name=foo"], "optim.name='foo'"
    elif case == "workdir_not_dir":
        (tmp_path / "afile").write_text("x")
        workdir, expect = tmp_path / "afile" / "run", "cannot write to the workdir"
    elif case == "disk_full":
        def full(fd):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(os, "fsync", full)
        expect = "No space left on device"
    elif case == "vocab_small":
        extra, expect = ["--set", "model.vocab_size=10"], "model.vocab_size=10"
    elif case == "bad_key":
        extra, expect = ["--set", "model.hiden=3"], "unknown config key 'model.hiden'"
    rc = train_main(_cli(tmp_path, *extra, "--set", "train.num_steps=1", workdir=workdir,
                         config=config))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("tinyonn-train: ") and expect in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match="train.seed"):
        train_main(_cli(tmp_path, "--set", "train.seed=1.5", "--debug"))


# 13. bad files counted once, listed in the workdir ------------------------------------------

def test_bad_files_are_counted_once_and_listed(tmp_path):
    from tinyonn_jax.data.tasks import load_tasks

    data = tmp_path / "tasks"
    data.mkdir()
    for t in list(load_tasks("arc1", "train"))[:3]:
        (data / f"{t.task_id}.json").write_text(json.dumps({
            part: [{"input": i.tolist(), "output": o.tolist()} for i, o in getattr(t, part)]
            for part in ("train", "test")}))
    (data / "broken.json").write_text("{not json")
    (data / "ragged.json").write_text(json.dumps(
        {"train": [{"input": [[1], [1, 2]], "output": [[1]]}], "test": [{"input": [[1]]}]}))
    cfg = _micro_cfg(**{"data.source": str(data), "train.num_steps": 1, "train.eval_tasks": 1,
                        "train.eval_every": 1})
    out = trainer.run(cfg, tmp_path / "run", quiet=True)
    assert out["data/bad_task_files"] == 2
    lines = (tmp_path / "run" / trainer.BAD_FILES_NAME).read_text().splitlines()
    assert len(lines) == 2
    assert any("broken.json" in x and "malformed JSON" in x for x in lines)
    assert any("ragged.json" in x and "non-rectangular" in x for x in lines)


# Also: progress values name their step; --print-config; lr, config and dashboards logged -----

def test_progress_line_names_the_step_of_stale_values():
    out = StringIO()
    p = Progress(100, stream=out, print_every=1)
    p.update(80, {"train/main_loss": 1.5})
    p.update(81)
    lines = out.getvalue().splitlines()
    assert "loss 1.5" in lines[0] and "@" not in lines[0]
    assert "loss 1.5 @80" in lines[1]


def test_print_config_prints_the_parsed_config_and_exits(tmp_path, capsys):
    rc = train_main(_cli(tmp_path, "--set", "model.use_ffn=false", "--print-config"))
    assert rc == 0 and not (tmp_path / "run").exists()
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["use_ffn"] is False and printed["model"]["hidden"] == 32


def test_learning_rate_config_and_dashboards_are_logged(tmp_path):
    cfg = _micro_cfg(**{"optim.warmup_steps": 4, "train.num_steps": 3, "train.plot_every": 3,
                        "train.eval_every": 0})
    trainer.run(cfg, tmp_path, quiet=True)
    recs = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    schedule = optim.learning_rate(cfg.optim)
    for r in recs:  # the rate of the update made at this step (optax counts from 0)
        np.testing.assert_allclose(r["optim/lr/main"], float(schedule(r["step"] - 1)), rtol=1e-6)
        np.testing.assert_allclose(r["optim/lr/meta"], cfg.meta_optim.learning_rate, rtol=1e-6)
    tags = {v.tag for _, ev in _events(tmp_path / "logs") for v in ev.summary.value}
    assert "config/text_summary" in tags
    assert {"dashboards/core_metrics_latest", "dashboards/expert_dashboard_latest"} <= tags
