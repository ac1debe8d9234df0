"""The TRM data protocol (``data.demonstrations_from``) and the test-pair leakage check."""

import dataclasses
import json
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from tinyonn_jax import parallel, trainer
from tinyonn_jax.config import Config, DataConfig, TrainConfig, apply_overrides
from tinyonn_jax.data.protocol import (
    LeakageWarning,
    compose,
    leaked_test_pairs,
    warn_if_config_leaks,
    warn_if_leaked,
)
from tinyonn_jax.data.tasks import load_tasks
from tinyonn_jax.data.tokenizer import IM_END, IM_START, grid_to_tokens
from tinyonn_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ARC1_EVAL_IN_ARC2_TRAIN = 376  # measured: the same 376 tasks by id and by content
ARC1_EVAL_IN_ARC1_TRAIN = ["070dd51e"]  # its test pair is that of 40853293


def _grid(h: int, w: int, colour: int, mark: int) -> list[list[int]]:
    g = [[colour] * w for _ in range(h)]
    g[0][0] = mark
    return g


def _write_tasks(root: Path) -> None:
    """3 training tasks (colours 1-3) and 3 evaluation tasks with 3 demonstrations each
    (colours 4-6); every evaluation test pair is the only 4x5 output of colour 9 with its mark."""
    for folder in ("training", "evaluation"):
        (root / folder).mkdir(parents=True)
    for k in range(3):
        task = {"train": [{"input": _grid(2, 2, 1 + k, j), "output": _grid(2, 3, 2 + k, j)}
                          for j in range(2)],
                "test": [{"input": _grid(3, 2, 1 + k, 0), "output": _grid(3, 3, 3, 0)}]}
        (root / "training" / f"t{k}.json").write_text(json.dumps(task))
        task = {"train": [{"input": _grid(3, 3, 4 + j, k), "output": _grid(2, 4, 4 + j, k)}
                          for j in range(3)],
                "test": [{"input": _grid(3, 3, 7, k), "output": _grid(4, 5, 9, k)}]}
        (root / "evaluation" / f"e{k}.json").write_text(json.dumps(task))


def _dir_cfg(root: Path, **data) -> Config:
    d = dict(source=str(root), split="train", demonstrations_from="eval", max_len=128,
             min_bucket=32, batch_size=2, augment=False, views_per_task=1)
    d.update(data)
    return Config(data=DataConfig(**d), train=TrainConfig(eval_tasks=8))


def _contains(row: np.ndarray, needle: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(row, len(needle))
    return bool((windows == needle).all(axis=1).any())


def _output_tokens(grid: np.ndarray) -> np.ndarray:
    """An output grid as it stands in a training sequence: im_start, cells, im_end."""
    return np.array([IM_START, *grid_to_tokens(grid), IM_END])


def _epoch_rows(tasks, cfg) -> list[np.ndarray]:
    """The input rows of one epoch of the training program's data feed."""
    feed = trainer.DataFeed(tasks, cfg)
    rows, pos = [], {"epoch": 0}
    while pos["epoch"] == 0:
        batch, pos = feed.next(0)
        rows += list(batch["inputs"])
    return rows


def test_protocol_trains_on_eval_demonstrations_never_on_their_test_outputs(tmp_path):
    _write_tasks(tmp_path)
    cfg = _dir_cfg(tmp_path)
    tasks, held_out, bad = trainer.select_tasks(cfg)
    # Held out: exactly the evaluation tasks whose demonstrations train.
    assert sorted(t.task_id for t in held_out) == ["e0", "e1", "e2"]
    evals = held_out
    ids = sorted(t.task_id for t in tasks)
    assert ids == ["e0/demo0", "e0/demo1", "e0/demo2", "e1/demo0", "e1/demo1", "e1/demo2",
                   "e2/demo0", "e2/demo1", "e2/demo2", "t0", "t1", "t2"] and bad == []
    pseudo = {t.task_id: t for t in tasks}
    for e in evals:  # each pseudo-task: one demonstration as its query, the others as its demos
        for j, (inp, out) in enumerate(e.train):
            p = pseudo[f"{e.task_id}/demo{j}"]
            assert p.test[0][0] is inp and p.test[0][1] is out and len(p.train) == 2
    rows = _epoch_rows(tasks, cfg)
    for e in evals:
        # The search finds the eval tasks' demonstration outputs, and never their test output.
        assert all(any(_contains(r, _output_tokens(o)) for r in rows) for _, o in e.train)
        assert not any(_contains(r, _output_tokens(e.test[0][1])) for r in rows)
    assert leaked_test_pairs(tasks, held_out) == []


def test_protocol_off_keeps_the_split_and_excludes_held_out_by_id(tmp_path):
    _write_tasks(tmp_path)
    tasks, held_out, _ = trainer.select_tasks(_dir_cfg(tmp_path, demonstrations_from=""))
    assert sorted(t.task_id for t in tasks) == ["t0", "t1", "t2"]
    assert sorted(t.task_id for t in held_out) == ["e0", "e1", "e2"]
    # An eval test pair copied into a training task is found by content and warned about.
    rec = json.loads((tmp_path / "training" / "t0.json").read_text())
    rec["train"].append(json.loads((tmp_path / "evaluation" / "e1.json").read_text())["test"][0])
    (tmp_path / "training" / "t0.json").write_text(json.dumps(rec))
    with pytest.warns(LeakageWarning, match=r"1 of 3 evaluation tasks .*: e1;"):
        trainer.select_tasks(_dir_cfg(tmp_path, demonstrations_from=""))


def test_max_tasks_caps_both_splits_easiest_first_and_the_order_is_deterministic():
    cfg = Config(data=DataConfig(source="arc1", demonstrations_from="eval", max_tasks=5),
                 train=TrainConfig(eval_tasks=3))
    tasks, held_out, _ = trainer.select_tasks(cfg)
    again, _, _ = trainer.select_tasks(cfg)
    assert [t.task_id for t in tasks] == [t.task_id for t in again]
    own = [t for t in tasks if "/" not in t.task_id]
    used = {t.task_id.split("/")[0] for t in tasks if "/" in t.task_id}
    evals = {t.task_id: t for t in load_tasks("arc1", "eval")}
    assert len(own) == 5 and len(used) == 5 and used <= set(evals)
    assert len(tasks) == 5 + sum(len(evals[i].train) for i in used)
    assert {t.task_id for t in held_out} <= used and len(held_out) == 3
    # Every test pair of the used eval tasks: in no training task, by identity or content.
    arrays = {id(a) for t in tasks for pair in (*t.train, *t.test) for a in pair}
    assert not any(id(o) in arrays for i in used for _, o in evals[i].test)
    assert leaked_test_pairs(tasks, [evals[i] for i in used]) == []
    # Without the protocol, the same 5 training tasks (the easiest of arc1 train).
    plain = compose(load_tasks("arc1", "train"), None, 5).tasks
    assert [t.task_id for t in own] == [t.task_id for t in plain]


def test_arc2_train_holds_most_arc1_eval_test_pairs():
    arc1_eval = load_tasks("arc1", "eval")
    arc2_train = load_tasks("arc2", "train")
    by_id = {t.task_id for t in arc2_train} & {t.task_id for t in arc1_eval}
    with pytest.warns(LeakageWarning, match=f"{ARC1_EVAL_IN_ARC2_TRAIN} of 400 evaluation"):
        leaked = warn_if_leaked(arc2_train, arc1_eval)
    assert len(leaked) == ARC1_EVAL_IN_ARC2_TRAIN and set(leaked) == by_id
    assert leaked_test_pairs(load_tasks("arc1", "train"), arc1_eval) == ARC1_EVAL_IN_ARC1_TRAIN


def test_content_not_id_decides_a_leak():
    arc1_eval = load_tasks("arc1", "eval")[:4]
    renamed = [dataclasses.replace(t, task_id=f"copy-of-{t.task_id}") for t in arc1_eval]
    assert leaked_test_pairs(renamed, arc1_eval) == [t.task_id for t in arc1_eval]
    # The same ids with their demonstrations only: nothing is leaked.
    demos_only = [dataclasses.replace(t, test=t.train[:1]) for t in arc1_eval]
    assert leaked_test_pairs(demos_only, arc1_eval) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_leaked(demos_only, arc1_eval) == []


def test_warn_if_config_leaks_loads_what_the_config_trains_on(tmp_path):
    arc1_eval = load_tasks("arc1", "eval")
    arc2 = Config(data=DataConfig(source="arc2", split="train"))
    with pytest.warns(LeakageWarning, match="arc2 train"):
        assert len(warn_if_config_leaks(arc2, arc1_eval)) == ARC1_EVAL_IN_ARC2_TRAIN
    trm = trainer.load_config(ROOT / "configs" / "arc_agi1_trm.py")
    with pytest.warns(LeakageWarning, match="1 of 400"):
        assert warn_if_config_leaks(trm, arc1_eval) == ARC1_EVAL_IN_ARC1_TRAIN
    gone = Config(data=DataConfig(source=str(tmp_path / "elsewhere")))
    with pytest.warns(UserWarning, match="cannot check"):
        assert warn_if_config_leaks(gone, arc1_eval) == []


def test_trm_config_loads_with_the_protocol_on():
    cfg = trainer.load_config(ROOT / "configs" / "arc_agi1_trm.py")
    base = trainer.load_config(ROOT / "configs" / "arc_agi1.py")
    assert (cfg.data.source, cfg.data.split, cfg.data.demonstrations_from) == (
        "arc1", "train", "eval")
    assert (cfg.model, cfg.optim, cfg.sars, cfg.train) == (
        base.model, base.optim, base.sars, base.train)
    assert dataclasses.replace(cfg.data, demonstrations_from="") == base.data
    trainer.check_config(cfg, parallel.make_mesh(cfg.train, jax.devices()[:1]))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("[!_]*.py")),
                         ids=lambda p: p.stem)
def test_every_config_loads_and_passes_check_config(path):
    cfg = trainer.load_config(path)
    trainer.check_config(cfg, parallel.make_mesh(cfg.train, jax.devices()[:1]))


@pytest.mark.parametrize("data", [dict(demonstrations_from="test"),
                                  dict(demonstrations_from="train"),
                                  dict(split="eval", demonstrations_from="eval"),
                                  dict(demonstrations_from=1)])
def test_bad_demonstrations_from_is_a_config_error(data):
    with pytest.raises(ConfigError, match="data.demonstrations_from"):
        DataConfig(**data)


def test_demonstrations_from_is_settable():
    cfg = apply_overrides(Config(), ["data.demonstrations_from=eval"])
    assert cfg.data.demonstrations_from == "eval"
    assert DataConfig(split="eval", demonstrations_from="train").demonstrations_from == "train"
    with pytest.raises(ConfigError, match="data.demonstrations_from"):
        apply_overrides(Config(), ["data.demonstrations_from=evaluation"])


def test_a_saved_config_without_the_field_resumes_as_its_default():
    """A checkpoint config written before ``data.demonstrations_from`` existed is the same
    config (the field at its default), so the data stream position stays valid."""
    import json

    from tinyonn_jax.trainer import _changed_keys, load_config

    now = load_config(ROOT / "configs" / "tiny.py").to_dict()
    old = json.loads(json.dumps(now))
    del old["data"]["demonstrations_from"]
    assert _changed_keys(old, now) == []
    old["data"]["max_len"] = 7
    assert _changed_keys(old, now) == ["data.max_len"]
