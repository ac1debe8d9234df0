"""The training program: data -> sharded jitted steps -> metrics, dashboards, checkpoints.

``run(cfg, workdir, resume=...)`` is what ``tinyonn-train`` calls. It is a host loop around one
jitted, state-donating step per batch shape; everything numeric happens in the family's pure
``train_step``. Only process 0 writes logs and plots; every process takes part in checkpoints
(orbax writes each process's shards).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tinyonn_jax import ema as ema_lib
from tinyonn_jax import loss as task_loss
from tinyonn_jax import parallel
from tinyonn_jax.checkpoint import Checkpointer
from tinyonn_jax.config import Config
from tinyonn_jax.data.batching import BatchStream, pack_sequences
from tinyonn_jax.data.curriculum import order_by_difficulty, warmup_count
from tinyonn_jax.data.tasks import Task, load_tasks
from tinyonn_jax.data.tokenizer import serialize_task
from tinyonn_jax.families import Family, get_family, usage_rows
from tinyonn_jax.observe import dashboards
from tinyonn_jax.observe.progress import Progress
from tinyonn_jax.observe.writer import MetricsWriter, load_history


def load_config(path: str | Path) -> Config:
    """Import a config file exposing ``get_config() -> Config``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"tinyonn_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, Config):
        raise ValueError(f"{path}: get_config() must return tinyonn_jax.config.Config")
    return cfg


def select_tasks(cfg: Config) -> tuple[list[Task], list[Task], int]:
    """Training tasks (easiest first, ``max_tasks`` of them), held-out tasks, bad-file count."""
    tasks = load_tasks(cfg.data.source, cfg.data.split)
    bad = tasks.report.num_skipped
    ordered = order_by_difficulty(tasks)
    if cfg.data.max_tasks:
        ordered = ordered[: cfg.data.max_tasks]
    held_out: list[Task] = []
    if cfg.train.eval_tasks:
        other = "eval" if cfg.data.split == "train" else "train"
        try:
            held = load_tasks(cfg.data.source, other)
            bad += held.report.num_skipped
            train_ids = {t.task_id for t in ordered}
            held_out = [t for t in order_by_difficulty(held) if t.task_id not in train_ids
                        and all(o is not None for _, o in t.test)][: cfg.train.eval_tasks]
        except (FileNotFoundError, ValueError) as e:
            warnings.warn(f"no held-out tasks for evaluation: {e}", stacklevel=2)
    if not ordered:
        raise ValueError(f"no usable tasks in data.source={cfg.data.source!r}")
    return ordered, held_out, bad


class DataFeed:
    """Curriculum-aware, resumable batch source. Position: {'stage', 'epoch', 'index'}."""

    def __init__(self, tasks: list[Task], cfg: Config, position: dict | None = None):
        self.cfg = cfg
        self.stage_tasks = [tasks[: warmup_count(len(tasks), cfg.data.curriculum_warmup)], tasks]
        position = dict(position or {"stage": 0 if cfg.data.curriculum_steps else 1,
                                     "epoch": 0, "index": 0})
        self.stage = int(position.pop("stage", 1))
        self.stream = BatchStream(self.stage_tasks[self.stage], cfg.data, start=position)

    def next(self, step: int) -> tuple[dict, dict]:
        if self.stage == 0 and step >= self.cfg.data.curriculum_steps:
            self.stage = 1
            self.stream = BatchStream(self.stage_tasks[1], self.cfg.data)
        batch, pos = next(self.stream)
        return batch, {"stage": self.stage, **pos}

    @property
    def skipped(self) -> int:
        return int(sum(self.stream.skipped.values()))


def _state_template(family: Family, cfg: Config, optimizer, mesh, key):
    shapes = jax.eval_shape(lambda k: family.init_state(cfg, optimizer, k), key)
    shardings = parallel.state_shardings(mesh, shapes, tuple(family.expert_pools(cfg).values()))
    return shapes, shardings


def restore_train_state(workdir: str | Path, cfg: Config | None = None,
                        step: int | None = None) -> tuple[Any, dict, Config]:
    """Restore (state, data position, config) from ``workdir/checkpoints`` on the default device.

    Without ``cfg`` the checkpoint's own config is used to build the state template.
    """
    ckdir = Path(workdir) / "checkpoints"
    if not ckdir.is_dir():
        raise FileNotFoundError(f"{workdir} has no checkpoints directory")
    with Checkpointer(ckdir, read_only=True) as c:
        if c.latest_step() is None:
            raise FileNotFoundError(f"{ckdir} holds no complete checkpoint")
        if cfg is None:
            cfg = Config.from_dict(c.restore_config(step))
        family = get_family(cfg)
        key = jax.random.key(cfg.train.seed)
        opt = family.build_optimizer(cfg, jax.eval_shape(lambda k: family.init_params(k, cfg),
                                                         key))
        template = jax.eval_shape(lambda k: family.init_state(cfg, opt, k), key)
        state, position, _ = c.restore(template, step=step)
    return state, position, cfg


def _split_metrics(m: dict) -> tuple[dict, dict]:
    scalars = {k: v for k, v in m.items() if np.ndim(v) == 0}
    vectors = {k: v for k, v in m.items() if np.ndim(v) > 0}
    return scalars, vectors


def evaluate_held_out(state, params, batches: list[dict], eval_fn) -> dict:
    """Teacher-forced loss / token accuracy / exact match on held-out task test outputs."""
    if not batches:
        return {}
    tot = {"eval/main_loss": 0.0, "eval/token_acc": 0.0, "eval/exact_acc": 0.0}
    for b in batches:
        m = jax.device_get(eval_fn(state, params, b))
        for k in tot:
            tot[k] += float(m[k]) / len(batches)
    return tot


def _eval_metrics(family: Family, cfg: Config):
    def fn(state, params, batch):
        logits = family.logits(state, params, batch["inputs"], cfg,
                               positions=batch["positions"], segment_ids=batch["segment_ids"])
        return task_loss.eval_metrics(logits, batch)

    return jax.jit(fn)


def run(cfg: Config, workdir: str | Path, *, resume: bool = False, devices=None,
        quiet: bool = False) -> dict[str, Any]:
    """Train ``cfg`` in ``workdir``. Returns the last logged scalar metrics (host floats)."""
    parallel.maybe_initialize_distributed()
    workdir = Path(workdir)
    primary = parallel.is_primary()
    family = get_family(cfg)
    mesh = parallel.make_mesh(cfg.train, devices)
    if cfg.data.batch_size % mesh.shape[parallel.DATA]:
        raise ValueError(f"config data.batch_size={cfg.data.batch_size} must be divisible by the "
                         f"data axis of the mesh ({mesh.shape[parallel.DATA]} devices)")
    tasks, held_out, bad_files = select_tasks(cfg)

    key = jax.random.key(cfg.train.seed)
    params_shape = jax.eval_shape(lambda k: family.init_params(k, cfg), key)
    optimizer = family.build_optimizer(cfg, params_shape)
    shapes, state_sh = _state_template(family, cfg, optimizer, mesh, key)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
    position = None
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise SystemExit(f"{workdir} already holds checkpoints (latest step {latest}); pass "
                         "--resume to continue, or choose a new --workdir")
    if resume and latest is not None:
        template = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, state_sh)
        state, position, saved = ckpt.restore(template)
        if saved.get("model") != cfg.to_dict()["model"]:
            raise SystemExit("--resume: the checkpoint was trained with a different model "
                             "config; refusing to continue it with this one")
    else:
        init = jax.jit(lambda k: family.init_state(cfg, optimizer, k), out_shardings=state_sh)
        state = init(key)
    feed = DataFeed(tasks, cfg, position)

    replicated = NamedSharding(mesh, P())
    step_fn = jax.jit(functools.partial(family.train_step, cfg=cfg, optimizer=optimizer),
                      in_shardings=(state_sh, parallel.batch_sharding(mesh)),
                      out_shardings=(state_sh, replicated), donate_argnums=(0,))
    eval_fn = _eval_metrics(family, cfg)
    eval_batches = []
    if held_out:
        seqs = [serialize_task(t, 0) for t in held_out]
        eval_batches, _ = pack_sequences(seqs, cfg.data.batch_size, cfg.data.min_bucket,
                                         cfg.data.max_len)
        eval_batches = [parallel.shard_batch(b, mesh) for b in eval_batches]

    logdir = workdir / "logs"
    start = int(jax.device_get(state.step))
    previous = load_history(logdir / "metrics.jsonl") if (
        resume and (logdir / "metrics.jsonl").exists()) else {}
    writer = MetricsWriter(logdir, enabled=primary)
    # A resumed run's dashboards continue the curves up to the restored step (steps logged after
    # it by the interrupted process are superseded).
    writer.history.update({k: [(s, v) for s, v in pts if s <= start]
                           for k, pts in previous.items()})
    expert_log = dashboards.ExpertLog()
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    progress = Progress(cfg.train.num_steps, enabled=primary and not quiet, start_step=start)
    pools = family.expert_pools(cfg)
    last: dict[str, Any] = {}
    tokens_since, t_last, steps_since = 0.0, time.perf_counter(), 0
    pos = position or {}
    try:
        for step in range(start, cfg.train.num_steps):
            batch, pos = feed.next(step)
            tokens = float(np.sum(batch["segment_ids"] > 0))
            state, metrics = step_fn(state, parallel.shard_batch(batch, mesh))
            tokens_since += tokens
            steps_since += 1
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.num_steps:
                scalars, vectors = _split_metrics(jax.device_get(metrics))
                now = time.perf_counter()
                scalars["perf/step_time_s"] = (now - t_last) / steps_since
                scalars["perf/tokens_per_s"] = tokens_since / (now - t_last)
                scalars["data/padding_waste"] = feed.stream.padding_waste
                scalars["data/skipped_sequences"] = feed.skipped
                scalars["data/bad_task_files"] = bad_files
                if pools:
                    scalars.setdefault("experts/num_experts", float(sum(pools.values())))
                if cfg.train.eval_every and eval_batches and done % cfg.train.eval_every == 0:
                    # The EMA of the parameters when train.ema_decay > 0, else the params.
                    scalars.update(evaluate_held_out(state, ema_lib.eval_params(state),
                                                     eval_batches, eval_fn))
                last = writer.scalars(done, scalars)
                usage, live = (family.expert_rows or usage_rows)(vectors)
                if usage:
                    expert_log.record(done, usage, live=live)
                progress.update(done, last, tokens=tokens_since)
                tokens_since, t_last, steps_since = 0.0, now, 0
            else:
                progress.update(done)
            if family.maintain is not None:
                state, events = family.maintain(state, cfg, done)
                for ev_step, kind, expert_id, site in events:
                    expert_log.event(ev_step, kind, expert_id, site=site)
                if events and primary:
                    with open(logdir / "lifecycle.jsonl", "a", encoding="utf-8") as f:
                        for ev_step, kind, expert_id, site in events:
                            f.write(json.dumps({"step": int(ev_step), "kind": kind,
                                                "expert": int(expert_id), "site": site}) + "\n")
            if primary and (done % cfg.train.plot_every == 0 or done == cfg.train.num_steps):
                dashboards.plot_core_metrics(writer.history, logdir)
                if expert_log.sites:
                    dashboards.plot_expert_dashboard(expert_log, logdir)
            if done % cfg.train.ckpt_every == 0 or done == cfg.train.num_steps:
                ckpt.save(done, state, pos, cfg.to_dict(), wait=False)
    finally:
        progress.close()
        ckpt.wait_until_finished()
        ckpt.close()
        writer.close()
    last["train/final_step"] = cfg.train.num_steps
    return last


def config_summary(cfg: Config) -> str:
    """One line per section for the start of a run."""
    return "\n".join(f"{f.name}: {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))

