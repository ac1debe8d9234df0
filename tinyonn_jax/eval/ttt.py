"""Test-time training (TTT): fine-tune a copy of the parameters on one task's demonstrations.

Training data: the task's leave-one-out pseudo-tasks (``data.tasks.leave_one_out``: each
demonstration in turn is the test pair, the others its demonstrations), in the augmented views
``data.batching.BatchStream`` draws from ``cfg.data`` (``views_per_task`` views of D8 transforms,
colour permutations and demonstration orders when ``augment``), packed into batches of
``cfg.data.batch_size`` rows. The task's own test pairs are never read, so its answers stay
held out. A sequence longer than ``cfg.data.max_len`` is skipped by the batching and counted.

The ``N`` fine-tuning steps are one jitted call: ``lax.scan`` of the family's pure
``train_state.train_step`` over ``N`` batches stacked to (N, B, T). Every batch of a task is
padded to one power-of-two bucket length T (``data.batching.bucket_sizes``: from
``cfg.data.min_bucket`` up to ``cfg.data.max_len``), so tasks of similar size share one
compilation; the jitted function is cached per TTT config and compiles once per (N, B, T).

Each task starts from a copy of the base parameters and extras (``jnp.array(x, copy=True)``
leaf by leaf) and a fresh optimizer state; the copy is what the jitted call donates, so the
base state is never modified. The optimizer is the family's (``build_optimizer``) for a TTT
config (``ttt_config``): the ``optim`` chain with its learning rate replaced by ``lr`` when
given, both chains at a constant rate without warm-up (a schedule sized for the training run
would leave a few TTT steps at a warm-up rate near 0), no EMA (the adapted parameters are the
live ones after the last step).
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tinyonn_jax import train_state
from tinyonn_jax.config import Config
from tinyonn_jax.data.batching import Batch, BatchStream, pack_sequences
from tinyonn_jax.data.tasks import Task, leave_one_out
from tinyonn_jax.data.tokenizer import PAD, serialize_task
from tinyonn_jax.families.registry import get_family

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


@dataclass(frozen=True)
class Adapted:
    """Result of ``adapt``.

    ``params`` / ``extras``: the fine-tuned copies, or the base objects themselves when nothing
    was trained (``trained=False``, ``reason`` says why: no steps, fewer than two
    demonstrations, no sequence within ``data.max_len``). ``losses`` (N,) float32: the main
    loss (``train/main_loss``) of every step's batch, before that step's update (empty when not
    trained). ``seconds``: wall-clock time of the adaptation (batching, the jitted steps, and
    their compilation when the bucket is new). ``n_skipped``: training sequences longer than
    ``data.max_len`` (over the epochs of views drawn). ``skipped_updates``: updates the guard
    skipped because something was non-finite. ``length``: the bucket length T (0 when not
    trained).
    """

    params: Any
    extras: Any
    losses: np.ndarray
    seconds: float
    trained: bool = True
    reason: str = ""
    n_skipped: int = 0
    skipped_updates: int = 0
    length: int = 0


def ttt_config(cfg: Config, lr: float | None = None) -> Config:
    """``cfg`` for test-time training: ``optim.learning_rate = lr`` (when given), both optimizer
    chains at a constant rate without warm-up, no EMA. Raises ``ConfigError`` for a bad ``lr``
    (it names ``optim.learning_rate``)."""
    def constant(oc, rate):
        return dataclasses.replace(oc, learning_rate=rate, schedule="constant",
                                   warmup_steps=0, decay_steps=0)

    return dataclasses.replace(
        cfg,
        optim=constant(cfg.optim, cfg.optim.learning_rate if lr is None else float(lr)),
        meta_optim=constant(cfg.meta_optim, cfg.meta_optim.learning_rate),
        train=dataclasses.replace(cfg.train, ema_decay=0.0))


def copy_tree(tree: Any) -> Any:
    """A copy of every array leaf in its own buffer (typed PRNG keys included)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def pad_batch(batch: Batch, length: int) -> Batch:
    """``batch`` (B, T <= length) padded on the right to (B, length): PAD tokens and targets,
    zero weights, segment 0 and position 0, as ``build_batch`` pads."""
    t = batch["inputs"].shape[1]
    if t > length:
        raise ValueError(f"batch of length {t} does not fit length {length}")
    fill = {"inputs": PAD, "targets": PAD, "weights": 0.0, "segment_ids": 0, "positions": 0}
    return {k: np.pad(batch[k], ((0, 0), (0, length - t)), constant_values=fill[k])
            for k in BATCH_KEYS}


def ttt_batches(cfg: Config, task: Task, steps: int, seed: int = 0) -> tuple[Batch | None, int]:
    """The ``steps`` training batches of ``task``, stacked: each key (N, B, T).

    The batches are the first ``steps`` of a ``BatchStream`` over ``leave_one_out(task)``
    (``cfg.data``, ``seed``), padded to the longest bucket among them. Returns
    ``(batches, n_skipped)``, ``batches=None`` when the task has fewer than two demonstrations
    or none of its sequences fits ``cfg.data.max_len``; ``n_skipped`` counts the sequences
    longer than ``cfg.data.max_len``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    pseudo = leave_one_out(task)
    if not pseudo:
        return None, 0
    views = cfg.data.views_per_task if cfg.data.augment else 1
    with warnings.catch_warnings():  # skipped sequences are counted in the result instead
        warnings.simplefilter("ignore")
        try:
            stream = BatchStream(pseudo, cfg.data, seed=seed)
            drawn = [next(stream)[0] for _ in range(steps)]
        except ValueError:  # every sequence of an epoch's views exceeds data.max_len
            return None, len(pseudo) * views
    length = max(b["inputs"].shape[1] for b in drawn)
    padded = [pad_batch(b, length) for b in drawn]
    stacked = {k: np.stack([b[k] for b in padded]) for k in BATCH_KEYS}
    return stacked, int(stream.skipped["too_long"])


def _scan_steps(state: train_state.TrainState, batches: Batch, *, family, cfg: Config,
                optimizer) -> tuple[train_state.TrainState, jax.Array]:
    """``train_step`` over the leading axis of ``batches`` (N, B, T); returns the final state
    and the main loss of every step (N,)."""
    def body(s, batch):
        s, metrics = train_state.train_step(s, batch, family=family, cfg=cfg,
                                            optimizer=optimizer)
        return s, metrics["train/main_loss"]

    return jax.lax.scan(body, state, batches)


@functools.lru_cache(maxsize=16)
def _adapt_fn(cfg: Config):
    """(jitted steps, optimizer) of a TTT config; the fresh state (argument 0) is donated."""
    family = get_family(cfg)
    optimizer = family.build_optimizer(cfg)
    fn = functools.partial(_scan_steps, family=family, cfg=cfg, optimizer=optimizer)
    return jax.jit(fn, donate_argnums=(0,)), optimizer


def adapt(params: Any, extras: Any, cfg: Config, task: Task, *, steps: int,
          lr: float | None = None, seed: int = 0) -> Adapted:
    """Fine-tune a copy of ``params`` (and ``extras``) on ``task``'s demonstrations.

    ``steps`` updates (one jitted ``lax.scan``) on the batches of ``ttt_batches(cfg, task,
    steps, seed)`` with a fresh optimizer state of ``ttt_config(cfg, lr)``. ``params`` and
    ``extras`` are read, never modified or donated. ``steps == 0``, a task with fewer than two
    demonstrations, or one whose every sequence exceeds ``cfg.data.max_len`` returns the base
    objects with ``trained=False`` and the reason. Raises ``ValueError`` for ``steps < 0``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    t0 = time.perf_counter()
    untrained = functools.partial(Adapted, params, extras, np.zeros(0, np.float32),
                                  trained=False)
    if steps == 0:
        return untrained(time.perf_counter() - t0, reason="steps=0")
    if len(task.train) < 2:
        return untrained(time.perf_counter() - t0,
                         reason=f"{len(task.train)} demonstration(s); leave-one-out needs 2")
    tcfg = ttt_config(cfg, lr)
    batches, n_skipped = ttt_batches(tcfg, task, steps, seed)
    if batches is None:
        return untrained(time.perf_counter() - t0, n_skipped=n_skipped,
                         reason=f"no demonstration sequence fits data.max_len="
                                f"{cfg.data.max_len}")
    fn, optimizer = _adapt_fn(tcfg)
    state = train_state.init_state(copy_tree(params), copy_tree(extras), optimizer, 0.0)
    state, losses = fn(state, batches)
    losses, skipped = jax.device_get((losses, state.skipped))
    return Adapted(state.params, state.extras, np.asarray(losses, np.float32),
                   time.perf_counter() - t0, n_skipped=n_skipped,
                   skipped_updates=int(skipped), length=int(batches["inputs"].shape[-1]))


@functools.lru_cache(maxsize=16)
def _nll_fn(cfg: Config):
    """Jitted (params, extras, batch) -> (sum of weighted NLL, sum of weights)."""
    family = get_family(cfg)

    def nll(params, extras, batch):
        logits = family.logits(params, extras, batch["inputs"], cfg,
                               positions=batch["positions"], segment_ids=batch["segment_ids"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        w = batch["weights"]
        return jnp.sum(tok * w), jnp.sum(w)

    return jax.jit(nll)


def demo_loss(params: Any, extras: Any, cfg: Config, task: Task) -> float:
    """Mean cross entropy over the answer tokens of ``task``'s leave-one-out pseudo-tasks.

    Identity view, teacher forced (``family.logits`` on ``pack_sequences`` batches of
    ``cfg.data``, weighted by the batch weights). Raises ``ValueError`` naming the task when it
    has fewer than two demonstrations or none of its sequences fits ``cfg.data.max_len``.
    """
    pseudo = leave_one_out(task)
    if not pseudo:
        raise ValueError(f"task {task.task_id!r}: demo_loss needs >= 2 demonstrations, "
                         f"got {len(task.train)}")
    seqs = [serialize_task(t, 0) for t in pseudo]
    batches, _ = pack_sequences(seqs, cfg.data.batch_size, cfg.data.min_bucket, cfg.data.max_len)
    if not batches:
        raise ValueError(f"task {task.task_id!r}: no demonstration sequence fits "
                         f"data.max_len={cfg.data.max_len}")
    fn = _nll_fn(cfg)
    sums = [jax.device_get(fn(params, extras, b)) for b in batches]
    total = float(sum(s for s, _ in sums))
    count = float(sum(w for _, w in sums))
    return total / max(count, 1.0)
