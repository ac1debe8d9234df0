"""The training program: data -> sharded jitted steps -> metrics, dashboards, checkpoints.

``run(cfg, workdir, resume=...)`` is what ``tinyonn-train`` calls. It is a host loop around one
jitted, state-donating step per batch shape; everything numeric happens in the family's pure
``train_step``.

Several processes (``train.distributed``, ``parallel.maybe_initialize_distributed``): every
process runs this same program on its own devices of one global mesh. ``data.batch_size`` is the
global batch; each process builds only its own rows of it (``parallel.local_rows``,
``DataFeed``) from the global batch plan, so the data position saved with a checkpoint is the
same for every process and a resume with another process count continues the same stream.
Only process 0 holds the workdir lock and writes logs, plots, ``config.json``,
``bad_task_files.txt`` and ``lifecycle.jsonl``; every process takes part in checkpoints (orbax
writes each process's shards, process 0 the JSON items).

What the loop guarantees:

* one run per workdir (``workdir.WorkdirLock``); a second one is refused with the holder's PID;
* SIGINT / SIGTERM: the step in flight finishes, a checkpoint is saved, and ``run`` raises
  ``errors.Interrupted`` (exit code 130 / 143); a second signal exits at once;
* a state with inf or NaN is never saved (``optim.guarded_update`` skips such updates; the loop
  checks again before every save); ``train.warn_after_skips`` consecutive skipped updates give a
  warning, ``train.stop_after_skips`` stop the run with a ``UserError``;
* ``--resume`` restores the newest checkpoint that can be read (unreadable newer ones are moved
  to ``<workdir>/checkpoints_unreadable``), rewinds ``metrics.jsonl``, ``lifecycle.jsonl`` and
  TensorBoard to the restored step, and says what it does when there is nothing to resume or
  the config changed;
* every host batch is checked (``validate.check_batch``) before it reaches the jitted step.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tinyonn_jax import loss as task_loss
from tinyonn_jax import optim, parallel, train_state, validate
from tinyonn_jax.checkpoint import Checkpointer
from tinyonn_jax.config import Config
from tinyonn_jax.data.batching import BatchStream, pack_sequences
from tinyonn_jax.data.curriculum import order_by_difficulty, warmup_count
from tinyonn_jax.data.protocol import load_composition, warn_if_leaked
from tinyonn_jax.data.tasks import (
    Task,
    TaskFormatError,
    load_tasks,
    merge_skipped,
    write_skipped_report,
)
from tinyonn_jax.data.tokenizer import serialize_task
from tinyonn_jax.errors import ConfigError, Interrupted, UserError
from tinyonn_jax.families.registry import get_family
from tinyonn_jax.family import FamilyBase as Family
from tinyonn_jax.interrupts import GracefulStop
from tinyonn_jax.observe import dashboards
from tinyonn_jax.observe.profile import StepProfiler
from tinyonn_jax.observe.progress import Progress
from tinyonn_jax.observe.writer import JSONL_NAME, MetricsWriter, load_history
from tinyonn_jax.workdir import WorkdirLock, check_writable, rewind_jsonl

BAD_FILES_NAME = "bad_task_files.txt"
UNREADABLE_DIR = "checkpoints_unreadable"
LIFECYCLE_NAME = "lifecycle.jsonl"


def say(message: str) -> None:
    """A one-line notice of the training program on stderr (process 0 only)."""
    if parallel.is_primary():
        print(f"tinyonn-train: {message}", file=sys.stderr, flush=True)


def load_config(path: str | Path) -> Config:
    """Import a config file exposing ``get_config() -> Config``; ``UserError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file does not exist ({path})")
    spec = importlib.util.spec_from_file_location(f"tinyonn_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise UserError(f"config file has no get_config() ({path})")
        cfg = module.get_config()
    except UserError:  # ConfigError included
        raise
    except Exception as e:  # any error inside the user's file is the user's to fix
        raise UserError(f"config file raised {type(e).__name__}: {e} ({path})") from e
    if not isinstance(cfg, Config):
        raise UserError(f"get_config() must return tinyonn_jax.config.Config, got "
                        f"{type(cfg).__name__} ({path})")
    return cfg


def _load_quietly(source: str, split: str):
    """``load_tasks`` without its per-load bad-file warning: ``select_tasks`` reports the bad
    files of both loads once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="skipped .* bad task file")
        return load_tasks(source, split)


def select_tasks(cfg: Config) -> tuple[list[Task], list[Task], list[tuple[str, str]]]:
    """Training tasks (easiest first), held-out tasks, and the bad files of all loads, each file
    once (a folder without split sub-directories serves both splits).

    Training tasks: the easiest ``data.max_tasks`` of ``data.split``, plus, with
    ``data.demonstrations_from``, the leave-one-out pseudo-tasks of the easiest ``max_tasks``
    tasks of the other split (``data.protocol.compose``). Held-out tasks (``train.eval_tasks``
    of them, easiest first): those other-split tasks, whose test outputs nothing trains on; with
    the protocol off, the other split's tasks whose ids are not trained on. Says how many of
    each, and warns (``data.protocol.warn_if_leaked``) when a held-out test pair is a training
    pair."""
    demo_split = cfg.data.demonstrations_from
    try:
        comp = load_composition(cfg.data.source, cfg.data.split, demonstrations_from=demo_split,
                                max_tasks=cfg.data.max_tasks, load=_load_quietly)
    except (FileNotFoundError, TaskFormatError, ValueError) as e:
        raise UserError(f"cannot load tasks: {e} (data.source={cfg.data.source!r})") from None
    reports = list(comp.reports)
    ordered = comp.tasks
    held_out: list[Task] = []
    if cfg.train.eval_tasks and demo_split:
        held_out = [t for t in comp.demonstration_tasks
                    if t.has_test_outputs][: cfg.train.eval_tasks]
    elif cfg.train.eval_tasks:
        other = "eval" if cfg.data.split == "train" else "train"
        try:
            held = _load_quietly(cfg.data.source, other)
            reports.append(held.report)
            train_ids = {t.task_id for t in ordered}
            held_out = [t for t in order_by_difficulty(held) if t.task_id not in train_ids
                        and all(o is not None for _, o in t.test)][: cfg.train.eval_tasks]
        except (FileNotFoundError, ValueError) as e:
            warnings.warn(f"no held-out tasks for evaluation: {e}", stacklevel=2)
    if not ordered:
        raise UserError(f"no usable tasks (data.source={cfg.data.source!r}, "
                        f"data.split={cfg.data.split!r})")
    if demo_split:  # the composition of the protocol's training set
        say(f"training on {comp.describe()}; {len(held_out)} held-out {demo_split} tasks for "
            f"evaluation")
    if held_out:
        warn_if_leaked(ordered, held_out, what="held-out tasks of this run")
    return ordered, held_out, merge_skipped(*reports)


class DataFeed:
    """Curriculum-aware, resumable source of this process's rows of every global batch.

    ``rows`` are the global row indices this process builds (default: all). The position
    ``{'stage', 'epoch', 'index', 'processes'}`` locates the next global batch, so it is the
    same on every process; ``processes`` records how many processes fed the run. A run resumed
    with another process count continues the same global stream (each process recomputes its
    rows from the global plan); ``saved_processes`` is the count of the saved position.
    """

    def __init__(self, tasks: list[Task], cfg: Config, position: dict | None = None, *,
                 rows=None, processes: int = 1):
        self.cfg = cfg
        self.rows = rows
        self.processes = int(processes)
        self.stage_tasks = [tasks[: warmup_count(len(tasks), cfg.data.curriculum_warmup)], tasks]
        position = dict(position or {"stage": 0 if cfg.data.curriculum_steps else 1,
                                     "epoch": 0, "index": 0})
        self.stage = int(position.pop("stage", 1))
        self.saved_processes = int(position.pop("processes", 1))
        self.stream = BatchStream(self.stage_tasks[self.stage], cfg.data, start=position,
                                  rows=rows)

    def next(self, step: int) -> tuple[dict, dict]:
        if self.stage == 0 and step >= self.cfg.data.curriculum_steps:
            self.stage = 1
            self.stream = BatchStream(self.stage_tasks[1], self.cfg.data, rows=self.rows)
        batch, pos = next(self.stream)
        return batch, {"stage": self.stage, **pos, "processes": self.processes}

    @property
    def skipped(self) -> int:
        return int(sum(self.stream.skipped.values()))


def _state_template(family: Family, cfg: Config, optimizer, mesh, key):
    shapes = jax.eval_shape(lambda k: family.init_state(cfg, optimizer, k), key)
    shardings = parallel.state_shardings(mesh, shapes, family.expert_axes(cfg))
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
        opt = family.build_optimizer(cfg)
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
        logits = family.logits(params, state.extras, batch["inputs"], cfg,
                               positions=batch["positions"], segment_ids=batch["segment_ids"])
        return task_loss.eval_metrics(logits, batch)

    return jax.jit(fn)


def _vocab_field(cfg: Config) -> tuple[str, int]:
    """The config field holding the vocabulary size of the family's model, and its value."""
    return "model.vocab_size", cfg.model.vocab_size


def check_config(cfg: Config, mesh) -> None:
    """What the config must satisfy beyond its own fields, before anything is built."""
    name, vocab = _vocab_field(cfg)
    validate.check_vocab(vocab, "config", field=name)
    if cfg.data.batch_size % parallel.row_shards(mesh):
        raise ConfigError(f"config data.batch_size={cfg.data.batch_size}: the global batch must "
                          f"divide over the data x expert axes of the mesh "
                          f"({mesh.shape[parallel.DATA]} x {mesh.shape[parallel.EXPERT]} devices)")
    if cfg.train.stop_after_skips < cfg.train.warn_after_skips:
        raise ConfigError(f"config train.stop_after_skips={cfg.train.stop_after_skips}: must be "
                          f">= train.warn_after_skips={cfg.train.warn_after_skips}")


def _changed_keys(saved: dict, now: dict) -> list[str]:
    """``section.key`` of every value that differs between two ``Config.to_dict()``; a field the
    saved config lacks (written before the field existed) counts as its default."""
    try:
        saved = Config.from_dict(saved).to_dict()
    except (ConfigError, TypeError, ValueError):
        pass  # compared as saved
    keys = []
    if saved.get("family", "dyntrm") != now.get("family", "dyntrm"):
        keys.append("family")
    for section in sorted((set(saved) | set(now)) - {"family"}):
        a, b = saved.get(section) or {}, now.get(section) or {}
        keys += [f"{section}.{k}" for k in sorted(set(a) | set(b))
                 if json.dumps(a.get(k), default=str) != json.dumps(b.get(k), default=str)]
    return keys


# Data fields that do not change the order of batches: the stream position stays valid.
_DATA_FIELDS_KEEPING_POSITION = ("curriculum_warmup",)


def _restore_newest_readable(ckpt: Checkpointer, template, workdir: Path, cfg: Config):
    """(state, data position, saved config) of the newest checkpoint that restores and is
    finite; unreadable newer steps are moved aside with a warning. ``UserError`` when none."""
    failures = []
    for step in reversed(ckpt.all_steps()):
        try:
            saved = ckpt.restore_config(step)
            if (saved.get("family", "dyntrm"), saved.get("model")) != (cfg.family,
                                                                       cfg.to_dict()["model"]):
                raise UserError(f"--resume: checkpoint step {step} was trained with a different "
                                f"model config; refusing to continue it with this one "
                                f"({_changed_keys(saved, cfg.to_dict())[:5]})")
            state, position, saved = ckpt.restore(template, step=step)
            if not bool(jax.device_get(_all_finite(state))):
                raise ValueError("the saved state holds inf or NaN")
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure to read a step means "unreadable"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            failures.append((step, f"{type(e).__name__}: {first}"))
            continue
        for bad, why in failures:
            moved = ckpt.set_aside(bad, workdir / UNREADABLE_DIR)
            say(f"warning: checkpoint step {bad} cannot be restored ({why}); moved to {moved}")
        if failures:
            say(f"resuming from checkpoint step {step}, the newest readable one")
        return state, position, saved
    detail = "; ".join(f"step {s}: {why}" for s, why in failures)
    raise UserError(f"no checkpoint in {ckpt.directory} can be restored ({detail})")


@jax.jit
def _all_finite(tree) -> jax.Array:
    return optim.all_finite(tree)


def _rewind_logs(logdir: Path, step: int) -> None:
    """Drop what a stopped run logged after ``step`` (the step this run restarts from)."""
    for name in (JSONL_NAME, LIFECYCLE_NAME):
        dropped = rewind_jsonl(logdir / name, step)
        if dropped:
            say(f"{logdir / name}: dropped {dropped} record(s) after step {step}, logged by "
                "the previous run after its last checkpoint")


def _save(ckpt: Checkpointer, step: int, state, pos: dict, cfg: Config) -> None:
    """Save ``state`` unless it holds inf or NaN (then stop: the last checkpoint stays)."""
    if not bool(jax.device_get(_all_finite(state))):
        raise UserError(f"the train state at step {step} holds inf or NaN; not saving it (the "
                        f"last checkpoint in {ckpt.directory} is kept)")
    ckpt.save(step, state, pos, cfg.to_dict(), wait=False)


def run(cfg: Config, workdir: str | Path, *, resume: bool = False, devices=None,
        quiet: bool = False, profile: tuple[int, int] | None = None) -> dict[str, Any]:
    """Train ``cfg`` in ``workdir``. Returns the last logged scalar metrics (host floats).

    ``profile`` (START, STOP): a ``jax.profiler`` trace of those steps in ``workdir/profile``
    (``observe.profile.StepProfiler``, process 0).

    Raises ``UserError`` for what the user can fix (config, data, workdir, checkpoints) and
    ``Interrupted`` after a SIGINT / SIGTERM once the state is saved.
    """
    launcher = parallel.maybe_initialize_distributed(cfg.train.distributed)
    workdir = Path(workdir)
    primary = parallel.is_primary()
    if launcher is not None:
        say(f"jax.distributed ({launcher}): process {jax.process_index()} of "
            f"{jax.process_count()} ({jax.device_count()} devices, {jax.local_device_count()} "
            "on this process)")
    family = get_family(cfg)
    mesh = parallel.make_mesh(cfg.train, devices)
    check_config(cfg, mesh)
    lock = WorkdirLock(workdir)
    if primary:
        check_writable(workdir)
        lock.acquire()
    try:
        return _run_locked(cfg, workdir, family, mesh, resume=resume, quiet=quiet,
                           profile=profile)
    finally:
        lock.release()


def _run_locked(cfg: Config, workdir: Path, family: Family, mesh, *, resume: bool,
                quiet: bool, profile=None) -> dict[str, Any]:
    primary = parallel.is_primary()
    tasks, held_out, bad_files = select_tasks(cfg)
    if bad_files and primary:
        write_skipped_report(bad_files, workdir / BAD_FILES_NAME)
        say(f"skipped {len(bad_files)} bad task file(s); the list with reasons is in "
            f"{workdir / BAD_FILES_NAME}")

    key = jax.random.key(cfg.train.seed)
    optimizer = family.build_optimizer(cfg)
    shapes, state_sh = _state_template(family, cfg, optimizer, mesh, key)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
    try:
        return _train(cfg, workdir, family, mesh, ckpt, optimizer, shapes, state_sh, key, tasks,
                      held_out, len(bad_files), resume=resume, quiet=quiet, profile=profile)
    finally:
        ckpt.wait_until_finished()
        ckpt.close()


def _train(cfg, workdir, family, mesh, ckpt, optimizer, shapes, state_sh, key, tasks, held_out,
           bad_files: int, *, resume: bool, quiet: bool, profile=None) -> dict[str, Any]:
    primary = parallel.is_primary()
    position = None
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise UserError(f"the workdir already holds checkpoints (latest step {latest}); pass "
                        f"--resume to continue, or choose a new --workdir ({workdir})")
    if resume and latest is None:
        say(f"--resume: no checkpoint in {workdir / 'checkpoints'}; starting from step 0")
    if resume and latest is not None:
        template = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, state_sh)
        state, position, saved = _restore_newest_readable(ckpt, template, workdir, cfg)
        changed = _changed_keys(saved, cfg.to_dict())
        data_changed = [k for k in changed if k.startswith("data.")
                        and k.split(".", 1)[1] not in _DATA_FIELDS_KEEPING_POSITION]
        if data_changed:
            say(f"warning: --resume with changed data config {data_changed}; the data stream "
                "starts again from its beginning")
            position = None
        others = [k for k in changed if k not in data_changed
                  and k not in ("train.num_steps", "train.distributed")]
        if others:
            say(f"warning: --resume continues with changed config values {others}")
    else:
        init = jax.jit(lambda k: family.init_state(cfg, optimizer, k), out_shardings=state_sh)
        state = init(key)
    start = int(jax.device_get(state.step))
    if start > cfg.train.num_steps:
        raise UserError(f"the checkpoint is at step {start}, beyond train.num_steps="
                        f"{cfg.train.num_steps}; raise train.num_steps to train further")
    if resume and start == cfg.train.num_steps:
        say(f"the checkpoint is at step {start} = train.num_steps; nothing to train")
        return {"train/final_step": start}
    rows = parallel.local_rows(mesh, (cfg.data.batch_size, cfg.data.max_len))
    feed = DataFeed(tasks, cfg, position, rows=rows, processes=jax.process_count())
    if position is not None and feed.saved_processes != feed.processes:
        say(f"--resume: the checkpoint was written by {feed.saved_processes} process(es); "
            f"{feed.processes} continue its global data stream")

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
    if primary:
        _rewind_logs(logdir, start)
    previous = load_history(logdir / JSONL_NAME) if (logdir / JSONL_NAME).exists() else {}
    # TensorBoard hides what an earlier process in this logdir wrote for the steps this run redoes.
    earlier = primary and any(logdir.glob("events.out.tfevents.*"))
    writer = MetricsWriter(logdir, enabled=primary, purge_step=start + 1 if earlier else None)
    writer.history.update(previous)
    expert_log = dashboards.ExpertLog()
    if primary:
        config_json = json.dumps(cfg.to_dict(), indent=2, default=str)
        (workdir / "config.json").write_text(config_json)
        writer.text(start, "config", f"```\n{config_json}\n```")
    progress = Progress(cfg.train.num_steps, enabled=primary and not quiet, start_step=start)
    _, vocab = _vocab_field(cfg)
    num_experts = family.num_experts(cfg)
    last: dict[str, Any] = {}
    tokens_since, t_last, steps_since = 0.0, time.perf_counter(), 0
    pos = position or {}
    consecutive_skips = 0
    pending_ok = None  # update_ok of the previous step, read one step late (no device sync)
    profiler = StepProfiler(workdir, profile, enabled=primary)
    try:
        with GracefulStop() as stop:
            for step in range(start, cfg.train.num_steps):
                batch, pos = feed.next(step)
                validate.check_batch(batch, vocab)
                tokens = float(feed.stream.batch_tokens)  # of the global batch
                profiler.before_step(step + 1)
                state, metrics = step_fn(state, parallel.shard_batch(batch, mesh,
                                                                     cfg.data.batch_size))
                done = step + 1
                profiler.after_step(done, state)
                if pending_ok is not None:
                    consecutive_skips = _count_skips(cfg, pending_ok, consecutive_skips, done - 1)
                pending_ok = metrics["train/update_ok"]
                tokens_since += tokens
                steps_since += 1
                if done % cfg.train.log_every == 0 or done == cfg.train.num_steps:
                    scalars, vectors = _split_metrics(jax.device_get(metrics))
                    now = time.perf_counter()
                    scalars["perf/step_time_s"] = (now - t_last) / steps_since
                    scalars["perf/tokens_per_s"] = tokens_since / (now - t_last)
                    scalars["data/padding_waste"] = feed.stream.padding_waste
                    scalars["data/skipped_sequences"] = feed.skipped
                    scalars["data/bad_task_files"] = bad_files
                    if num_experts:
                        scalars.setdefault("experts/num_experts", float(num_experts))
                    if cfg.train.eval_every and eval_batches and done % cfg.train.eval_every == 0:
                        # The EMA of the parameters when train.ema_decay > 0, else the params.
                        scalars.update(evaluate_held_out(state, train_state.eval_params(state),
                                                         eval_batches, eval_fn))
                    last = writer.scalars(done, scalars)
                    usage, live = family.expert_rows(vectors)
                    if usage:
                        expert_log.record(done, usage, live=live)
                    progress.update(done, last, tokens=tokens_since)
                    tokens_since, t_last, steps_since = 0.0, now, 0
                else:
                    progress.update(done)
                state, events = family.maintain(state, cfg, done)
                for ev_step, kind, expert_id, site in events:
                    expert_log.event(ev_step, kind, expert_id, site=site)
                if events and primary:
                    with open(logdir / LIFECYCLE_NAME, "a", encoding="utf-8") as f:
                        for ev_step, kind, expert_id, site in events:
                            f.write(json.dumps({"step": int(ev_step), "kind": kind,
                                                "expert": int(expert_id), "site": site})
                                    + "\n")
                if primary and (done % cfg.train.plot_every == 0
                                or done == cfg.train.num_steps):
                    paths = [dashboards.plot_core_metrics(writer.history, logdir)]
                    if expert_log.sites:
                        paths.append(dashboards.plot_expert_dashboard(expert_log, logdir))
                    for path in paths:
                        writer.image(done, f"dashboards/{Path(path).stem}", path)
                if done % cfg.train.ckpt_every == 0 or done == cfg.train.num_steps:
                    _save(ckpt, done, state, pos, cfg)
                if stop.requested is not None:
                    if done % cfg.train.ckpt_every and done != cfg.train.num_steps:
                        _save(ckpt, done, state, pos, cfg)
                    ckpt.wait_until_finished()
                    raise Interrupted(stop.requested,
                                      f"interrupted at step {done}; checkpoint saved in "
                                      f"{ckpt.directory} (continue with --resume)")
            if pending_ok is not None:
                _count_skips(cfg, pending_ok, consecutive_skips, cfg.train.num_steps)
    finally:
        profiler.close()
        progress.close()
        writer.close()
    last["train/final_step"] = cfg.train.num_steps
    return last


def _count_skips(cfg: Config, update_ok, consecutive: int, step: int) -> int:
    """Consecutive skipped updates up to ``step``; warns and stops at the configured counts."""
    if float(jax.device_get(update_ok)) > 0:
        return 0
    consecutive += 1
    if consecutive == cfg.train.warn_after_skips:
        say(f"warning: {consecutive} consecutive updates skipped up to step {step} (non-finite "
            "loss, gradients or updated state); check optim.learning_rate and the data")
    if consecutive >= cfg.train.stop_after_skips:
        raise UserError(f"stopping: {consecutive} consecutive updates skipped up to step {step} "
                        "(non-finite loss, gradients or updated state); the last checkpoint is "
                        "kept (train.stop_after_skips)")
    return consecutive


def config_summary(cfg: Config) -> str:
    """One line per section for the start of a run."""
    return "\n".join(f"{f.name}: {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))

