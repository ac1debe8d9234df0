"""The training program (issue 5): sharding, resume, kill safety, robustness, CLI."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import chex
import numpy as np
import pytest

from tinyonn_jax import trainer
from tinyonn_jax.config import apply_overrides
from tinyonn_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"


def _micro_cfg(**over):
    """The tiny config shrunk further so a run takes seconds."""
    base = ["model.hidden=32", "model.num_heads=2", "model.num_attn_experts=8",
            "model.num_ffn_experts=4", "model.max_refinement_steps=2", "data.max_tasks=4",
            "data.max_len=256", "data.min_bucket=256", "data.batch_size=2", "train.log_every=1",
            "train.plot_every=2", "train.ckpt_every=2", "train.eval_every=2",
            "train.eval_tasks=1", "train.num_steps=4"]
    base += [f"{k}={v}" for k, v in over.items()]
    return apply_overrides(trainer.load_config(TINY), base)


def test_run_writes_events_dashboards_and_checkpoint(tmp_path):
    out = trainer.run(_micro_cfg(), tmp_path, quiet=True)
    logs = tmp_path / "logs"
    assert list(logs.glob("events.out.tfevents.*"))
    assert (logs / "core_metrics_latest.png").stat().st_size > 10_000
    assert (logs / "expert_dashboard_latest.png").stat().st_size > 10_000
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == \
        ["2", "4"]
    assert np.isfinite(out["train/main_loss"]) and "eval/token_acc" in out
    lines = (logs / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and "route/avg_k/ffn" in json.loads(lines[-1])


def test_existing_checkpoints_need_resume(tmp_path):
    trainer.run(_micro_cfg(**{"train.num_steps": 2}), tmp_path, quiet=True)
    with pytest.raises(UserError, match="--resume"):
        trainer.run(_micro_cfg(), tmp_path, quiet=True)


def test_resume_continues_exactly(tmp_path):
    """save -> restore -> next steps is bitwise identical to not stopping."""
    straight = trainer.run(_micro_cfg(), tmp_path / "a", quiet=True)
    trainer.run(_micro_cfg(**{"train.num_steps": 2}), tmp_path / "b", quiet=True)
    resumed = trainer.run(_micro_cfg(), tmp_path / "b", resume=True, quiet=True)
    assert straight["train/main_loss"] == resumed["train/main_loss"]
    states = [trainer.restore_train_state(tmp_path / d, step=4)[0] for d in ("a", "b")]
    chex.assert_trees_all_equal(states[0].params, states[1].params)
    chex.assert_trees_all_equal(states[0].opt_state, states[1].opt_state)


def test_cli_rejects_unknown_set_key(capsys):
    from train.main import main
    rc = main(["--config", str(TINY), "--workdir", "/nonexistent/x", "--set", "model.hiden=3"])
    assert rc == 2
    assert "unknown config key 'model.hiden'" in capsys.readouterr().err


def test_cli_rejects_bad_value(capsys):
    from train.main import main
    rc = main(["--config", str(TINY), "--workdir", "/nonexistent/x", "--set", "model.remat=all"])
    assert rc == 2 and "model.remat" in capsys.readouterr().err


SHARDED = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_trainer import _micro_cfg
    from tinyonn_jax import trainer
    assert len(jax.devices()) == 8
    out = {{}}
    for name, devs, over in (("one", jax.devices()[:1], {{}}),
                             ("eight", jax.devices(), {{"train.mesh_expert": 2}})):
        cfg = _micro_cfg(**{{"data.batch_size": 8, "train.num_steps": 3, "train.eval_every": 0,
                            "train.ckpt_every": 3, **over}})
        res = trainer.run(cfg, {tmp!r} + "/" + name, devices=devs, quiet=True)
        st = trainer.restore_train_state({tmp!r} + "/" + name, step=3)[0]
        out[name] = dict(loss=res["train/main_loss"],
                         params=[np.asarray(x).tolist() for x in jax.tree.leaves(st.params)])
    print("RESULT" + json.dumps(out))
""")


def test_sharded_equals_single_device(tmp_path):
    script = SHARDED.format(root=str(ROOT), tests=str(ROOT / "tests"), tmp=str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    np.testing.assert_allclose(res["one"]["loss"], res["eight"]["loss"], rtol=1e-5)
    for a, b in zip(res["one"]["params"], res["eight"]["params"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sigkill_during_training_resumes_from_last_complete_checkpoint(tmp_path):
    wd = tmp_path / "run"
    args = [sys.executable, "-m", "train.main", "--config", str(TINY), "--workdir", str(wd),
            "--quiet", "--set", "train.num_steps=400", "--set", "train.ckpt_every=3",
            "--set", "model.hidden=32", "--set", "model.num_heads=2",
            "--set", "model.max_refinement_steps=2", "--set", "data.max_tasks=4",
            "--set", "train.eval_every=0", "--set", "train.plot_every=1000"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckdir = wd / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [p for p in ckdir.glob("*") if p.name.isdigit()] if ckdir.exists() else []
        if len(done) >= 2:
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from tinyonn_jax.checkpoint import Checkpointer
    with Checkpointer(ckdir, read_only=True) as c:
        last = c.latest_step()
    assert last is not None and last % 3 == 0
    cfg = apply_overrides(trainer.load_config(TINY), [
        "model.hidden=32", "model.num_heads=2", "model.max_refinement_steps=2",
        "data.max_tasks=4", "train.eval_every=0", "train.plot_every=1000",
        f"train.num_steps={last + 2}", "train.ckpt_every=3"])
    out = trainer.run(cfg, wd, resume=True, quiet=True)
    assert np.isfinite(out["train/main_loss"])
    with Checkpointer(ckdir, read_only=True) as c:
        assert c.latest_step() == last + 2


@pytest.mark.parametrize("name", ["tiny_spl", "tiny_dynonn"])
def test_other_families_train_with_the_program(tmp_path, name):
    over = ["data.max_tasks=4", "data.max_len=256", "data.min_bucket=256", "data.batch_size=2",
            "train.log_every=1", "train.plot_every=6", "train.ckpt_every=6",
            "train.eval_every=6", "train.eval_tasks=1", "train.num_steps=6"]
    if name == "tiny_dynonn":
        # 2 of 16 live experts: homeless tokens (hence "add" events) do not depend on luck.
        over += ["model.lifecycle_period=2", "model.lifecycle_window=2", "model.init_experts=2"]
    cfg = apply_overrides(trainer.load_config(ROOT / "configs" / f"{name}.py"), over)
    out = trainer.run(cfg, tmp_path, quiet=True)
    assert np.isfinite(out["train/main_loss"]) and "eval/token_acc" in out
    assert (tmp_path / "logs" / "expert_dashboard_latest.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoints" / "6").is_dir()
    state, _, restored_cfg = trainer.restore_train_state(tmp_path)
    assert restored_cfg == cfg and int(state.step) == 6
    if name == "tiny_dynonn":
        events = [json.loads(x) for x in
                  (tmp_path / "logs" / "lifecycle.jsonl").read_text().splitlines()]
        assert {e["kind"] for e in events} & {"add", "remove", "regenerate"}
