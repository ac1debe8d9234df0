"""tinyonn-eval: restore a checkpoint written with the Checkpointer, evaluate, write the report."""

from __future__ import annotations

import json

import jax
import pytest
from conftest import tiny_model_config

from tinyonn_jax import optim, step
from tinyonn_jax.checkpoint import Checkpointer
from tinyonn_jax.config import Config
from tinyonn_jax.data import tokenizer
from tinyonn_jax.data.tasks import load_tasks
from tinyonn_jax.model import transformer as tr
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
    opt = optim.build_optimizer(cfg, tr.init_params(jax.random.key(0), cfg.model))
    state = step.init_state(cfg, opt, jax.random.key(0))
    with Checkpointer(root / "work" / "checkpoints", keep=2) as ckpt:
        ckpt.save(3, state, {"epoch": 0, "index": 0}, cfg.to_dict())
    tasks = load_tasks("arc1", "train")
    small = sorted(tasks, key=lambda t: len(tokenizer.serialize_prompt(t, 0)))[:2]
    data = root / "tasks"
    data.mkdir()
    for t in small:
        (data / f"{t.task_id}.json").write_text(json.dumps(_task_json(t)))
    return root, [t.task_id for t in small]


def test_cli_writes_report(run, capsys):
    root, ids = run
    out = root / "report.json"
    rc = cli.main(["--workdir", str(root / "work"), "--source", str(root / "tasks"),
                   "--split", "train", "--views", "2", "--max-new-tokens", "16",
                   "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert {"step", "source", "split", "aggregate", "reports", "config"} <= set(report)
    assert report["step"] == 3 and report["aggregate"]["n_tasks"] == 2
    assert {r["task_id"] for r in report["reports"]} == set(ids)
    assert {"task_score", "pair_pass2", "malformed_rate"} <= set(report["aggregate"])
    assert {"pass2", "top1", "n_views", "n_skipped"} <= set(report["reports"][0])
    printed = capsys.readouterr().out
    assert "aggregate" in printed and ids[0] in printed


def test_bad_workdir_is_a_clear_error(tmp_path, run):
    root, _ = run
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["--workdir", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no checkpoint directory"):
        cli.main(["--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"available steps: \[3\]"):
        cli.main(["--workdir", str(root / "work"), "--step", "7"])
