"""ARC evaluation: augmented views -> greedy generation -> map back -> vote -> pass@2.

For every task and test pair, ``num_views`` views are drawn (the identity view first, always),
each view's prompt is generated from greedily (``make_generator``: DynTRM with its KV-cache
decoder and adaptive depth, every other family by recomputing ``family.logits``), the answer is
decoded and mapped back to the original frame, and ``scoring.score_test`` votes over the views.
The aggregate reports the mean refinement steps the generations used (DynTRM's per-row depth).

Static shapes: prompts are grouped into power-of-two length buckets (at least ``min_bucket``,
capped at the longest admissible prompt) and generated in batches of a power-of-two number of
rows (at most ``batch_size``), so ``generate`` compiles at most
``#buckets * (log2(batch_size) + 1)`` times whatever the number of tasks.

A prompt longer than ``cfg.model.max_len - max_new_tokens`` (for a family whose model has a
``max_len``; the others have no limit) is skipped and counted
(``n_skipped`` of its test pair, ``n_views_skipped`` overall); a pair whose every view was
skipped is scored as unsolved. A generation is malformed (``None``, casts no vote) when it does
not decode to a grid or never emitted a stop token within the budget.

Test-time training (``ttt_steps > 0``): every task with a view to generate first fine-tunes a
copy of the parameters on its demonstrations (``eval.ttt.adapt``), then its views are generated
with that copy, batched and bucketed as above but one task at a time. The base parameters are
never modified; the seconds each adaptation took are reported per task.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from tinyonn_jax.config import Config
from tinyonn_jax.data import augment, tokenizer
from tinyonn_jax.data.tasks import Task
from tinyonn_jax.eval import scoring, ttt
from tinyonn_jax.eval.generate import (
    DEFAULT_MAX_NEW_TOKENS,
    STOP_TOKENS,
    Generation,
    generate,
    left_pad,
)
from tinyonn_jax.eval.recompute import FamilyLogits, generate_by_recompute
from tinyonn_jax.families.registry import get_family

# (tokens (B, Tp), lengths (B,), max_new_tokens) -> Generation
Generator = Callable[[jax.Array, jax.Array, int], Generation]


@dataclass
class EvalTestReport(scoring.TestReport):
    """``scoring.TestReport`` plus the number of views skipped because the prompt was too long."""

    __test__ = False

    n_skipped: int = 0
    # Seconds the task's test-time training took (the same for every pair of the task); None
    # without test-time training.
    ttt_seconds: float | None = None
    # Mean CE on the task's leave-one-out demonstrations before / after test-time training
    # (``ttt.demo_loss``); None when the task was not adapted.
    ttt_demo_loss_before: float | None = None
    ttt_demo_loss_after: float | None = None


@dataclass
class EvalAggregate(scoring.Aggregate):
    """``scoring.Aggregate`` plus evaluation-wide counts of what could not be evaluated."""

    n_views_skipped: int = 0  # views whose prompt exceeded the length limit
    n_pairs_unscored: int = 0  # test pairs without a known answer (hidden test sets)
    max_new_tokens: int = 0
    prompt_limit: int | None = 0  # None: the model has no length limit
    # Mean refinement steps over the generated views; None when the family has no adaptive depth.
    mean_refinement_steps: float | None = None
    ttt_steps: int = 0  # test-time training steps per task (0: off)
    ttt_seconds_per_task: float | None = None  # mean over the adapted tasks; None when off
    ttt_tasks_untrained: int = 0  # tasks left at the base parameters (``ttt.Adapted.reason``)
    # Means over the adapted tasks of ``EvalTestReport.ttt_demo_loss_*``; None when none.
    ttt_demo_loss_before: float | None = None
    ttt_demo_loss_after: float | None = None


@dataclass(frozen=True)
class _Job:
    """One generation: the view ``view_index`` of test pair ``pair``."""

    pair: int
    view_index: int
    view: augment.View
    prompt: np.ndarray


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def bucket_length(n: int, min_bucket: int, limit: int | None) -> int:
    """Padded prompt length for a prompt of ``n <= limit`` tokens: a power of two, capped
    (``limit=None``: not capped)."""
    length = max(min_bucket, _next_pow2(n))
    return length if limit is None else min(length, limit)


def prompt_limit(cfg: Config, max_new_tokens: int) -> int | None:
    """Longest admissible prompt: ``cfg.model.max_len - max_new_tokens``, at least 1; None when
    the family's model has no ``max_len`` (its positions are not bounded).

    Raises ``ValueError`` naming both when the budget leaves no room for a prompt.
    """
    max_len = getattr(cfg.model, "max_len", None)
    if max_len is None:
        return None
    limit = max_len - max_new_tokens
    if limit < 1:
        raise ValueError(f"model.max_len={cfg.model.max_len} leaves no room for a prompt next to "
                         f"max_new_tokens={max_new_tokens}")
    return limit


def task_rng(seed: int, task_id: str) -> np.random.Generator:
    """Per-task generator: a task's views do not depend on which other tasks are evaluated."""
    return np.random.default_rng([seed, zlib.crc32(task_id.encode())])


def make_generator(params: Any, cfg: Config, extras: Any = None) -> Generator:
    """The greedy generator of ``cfg.family``: DynTRM's KV-cache ``generate`` (per-row adaptive
    depth, ``Generation.steps``; with an expert pool in ``extras`` its live masks), every other
    family ``generate_by_recompute`` on ``family.logits`` with its ``extras`` (e.g. DynONN's
    live-expert pool). A row stops as soon as its answer can no longer be a grid
    (``grammar.AnswerState``): the score is the same, the malformed tail is not generated.
    """
    if cfg.family == "dyntrm":
        live = None if extras is None else extras.live
        return lambda tokens, lengths, n: generate(params, tokens, lengths, cfg.model,
                                                   max_new_tokens=n, live=live,
                                                   stop_hopeless=True)
    logits_fn = FamilyLogits(get_family(cfg), cfg)
    return lambda tokens, lengths, n: generate_by_recompute(
        logits_fn, (params, extras), tokens, lengths, max_new_tokens=n, stop_hopeless=True)


def _build_jobs(tasks: Sequence[Task], num_views: int, seed: int, limit: int | None):
    """Views and prompts of every scorable test pair. Returns (pairs, jobs, skipped, unscored)."""
    pairs: list[tuple[Task, int]] = []
    jobs: list[_Job] = []
    skipped: list[int] = []
    unscored = 0
    for task in tasks:
        views = augment.sample_views(task, num_views, task_rng(seed, task.task_id),
                                     include_identity=True)
        applied = [v.apply(task) for v in views]
        for ti, (_, truth) in enumerate(task.test):
            if truth is None:
                unscored += 1
                continue
            pairs.append((task, ti))
            skipped.append(0)
            for vi, (view, vtask) in enumerate(zip(views, applied, strict=True)):
                prompt = tokenizer.serialize_prompt(vtask, ti)
                if limit is not None and len(prompt) > limit:
                    skipped[-1] += 1
                else:
                    jobs.append(_Job(len(pairs) - 1, vi, view, prompt))
    return pairs, jobs, skipped, unscored


def _prediction(tokens: np.ndarray, n: int, logprob: float,
                view: augment.View) -> scoring.Prediction:
    """Decode one row of generated tokens and map the grid back to the original frame."""
    gen = tokens[:n]
    if n == 0 or int(gen[-1]) not in STOP_TOKENS:  # ran out of budget: no committed answer
        return None, logprob
    decoded = tokenizer.decode_generation(gen)
    return (view.invert_grid(decoded.grid) if decoded.ok else None), logprob


def ttt_demo_losses(params: Any, extras: Any, cfg: Config, task: Task,
                 adapted: ttt.Adapted) -> tuple[float | None, float | None]:
    """``ttt.demo_loss`` of the base and the adapted parameters; (None, None) when the task was
    not adapted or its identity view has no sequence within ``data.max_len``."""
    if not adapted.trained:
        return None, None
    try:
        return (ttt.demo_loss(params, extras, cfg, task),
                ttt.demo_loss(adapted.params, adapted.extras, cfg, task))
    except ValueError:
        return None, None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _generate_jobs(gen: Generator, jobs: Sequence[_Job], preds: list[dict],
                   steps_used: list[int], *, batch_size: int, max_new_tokens: int,
                   min_bucket: int, limit: int | None, done: int, total: int,
                   progress: Callable[[int, int], None] | None) -> int:
    """Generate ``jobs`` with ``gen`` in length buckets and batches of a power-of-two number of
    rows; fills ``preds`` and ``steps_used``. Returns the updated count of generated views."""
    buckets: dict[int, list[_Job]] = {}
    for job in jobs:
        buckets.setdefault(bucket_length(len(job.prompt), min_bucket, limit), []).append(job)
    for length in sorted(buckets):
        group = buckets[length]
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            rows = min(batch_size, _next_pow2(len(chunk)))
            # Filler rows repeat the first prompt; their outputs are dropped.
            prompts = [j.prompt for j in chunk] + [chunk[0].prompt] * (rows - len(chunk))
            tokens, lengths = left_pad(prompts, length)
            out = gen(tokens, lengths, max_new_tokens)
            toks, ns, lps = (np.asarray(a) for a in out[:3])
            for r, job in enumerate(chunk):
                preds[job.pair][job.view_index] = _prediction(toks[r], int(ns[r]),
                                                              float(lps[r]), job.view)
            if out.steps is not None:  # filler rows excluded
                steps_used.extend(np.asarray(out.steps)[:len(chunk)].tolist())
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return done


def evaluate_tasks(
    params: dict,
    cfg: Config,
    tasks: Sequence[Task],
    *,
    num_views: int = 8,
    seed: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    min_bucket: int = 64,
    progress: Callable[[int, int], None] | None = None,
    extras: Any = None,
    ttt_steps: int = 0,
    ttt_lr: float | None = None,
) -> tuple[list[EvalTestReport], EvalAggregate]:
    """Evaluate ``tasks`` with augmentation voting and pass@2.

    Args:
      params: model parameters of ``cfg.family`` (its ``init_params`` layout).
      cfg: the experiment config; ``cfg.family`` and ``cfg.model`` define the model (and
        ``max_len`` where it has one).
      tasks: tasks whose test outputs are known (pairs without an answer are counted, not run).
      num_views: views per test pair, the identity view included (>= 1).
      seed: seed of the view sampling (per task, independent of the task list).
      batch_size: maximum rows per generation call.
      max_new_tokens: generation budget, a constant (never the answer's size).
      min_bucket: smallest prompt bucket length.
      progress: called as ``progress(done, total)`` after every generation batch.
      extras: the family's extra train state its logits read (DynONN's expert pool), or None.
      ttt_steps: test-time training steps per task (``ttt.adapt``); 0 generates every task
        with ``params`` as they are.
      ttt_lr: learning rate of the test-time training (None: ``cfg.optim.learning_rate``).

    Returns:
      One ``EvalTestReport`` per scorable test pair (task order, then test index) and the
      ``EvalAggregate`` over them.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1 (the identity view), got {num_views}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if ttt_steps < 0:
        raise ValueError(f"ttt_steps must be >= 0, got {ttt_steps}")
    limit = prompt_limit(cfg, max_new_tokens)
    pairs, jobs, skipped, unscored = _build_jobs(tasks, num_views, seed, limit)
    preds: list[dict[int, scoring.Prediction]] = [{} for _ in pairs]
    steps_used: list[int] = []  # refinement steps of every generated view (adaptive depth)
    run = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, min_bucket=min_bucket,
               limit=limit, total=len(jobs), progress=progress)
    adapted_by: dict[int, tuple[float, float | None, float | None]] = {}  # id(task) -> TTT
    untrained = 0
    if ttt_steps == 0:
        _generate_jobs(make_generator(params, cfg, extras), jobs, preds, steps_used, done=0,
                       **run)
    else:
        by_task: dict[int, list[_Job]] = {}
        for job in jobs:
            by_task.setdefault(id(pairs[job.pair][0]), []).append(job)
        done = 0
        for task in tasks:
            group = by_task.pop(id(task), None)
            if not group:  # nothing to generate: no adaptation either
                continue
            a = ttt.adapt(params, extras, cfg, task, steps=ttt_steps, lr=ttt_lr, seed=seed)
            adapted_by[id(task)] = (a.seconds, *ttt_demo_losses(params, extras, cfg, task, a))
            untrained += not a.trained
            done = _generate_jobs(make_generator(a.params, cfg, a.extras), group, preds,
                                  steps_used, done=done, **run)

    reports = []
    for p, (task, ti) in enumerate(pairs):
        ordered = [preds[p][v] for v in sorted(preds[p])]  # view order: identity first
        base = scoring.score_test(task.task_id, ti, ordered, task.test[ti][1])
        secs, before, after = adapted_by.get(id(task), (None, None, None))
        reports.append(EvalTestReport(**dataclasses.asdict(base), n_skipped=skipped[p],
                                      ttt_seconds=secs, ttt_demo_loss_before=before,
                                      ttt_demo_loss_after=after))
    agg = scoring.aggregate(reports)
    runs = list(adapted_by.values())
    scored = [r for r in runs if r[1] is not None]
    summary = EvalAggregate(**dataclasses.asdict(agg), n_views_skipped=sum(skipped),
                            n_pairs_unscored=unscored, max_new_tokens=max_new_tokens,
                            prompt_limit=limit,
                            mean_refinement_steps=_mean(steps_used), ttt_steps=ttt_steps,
                            ttt_seconds_per_task=_mean([r[0] for r in runs]),
                            ttt_tasks_untrained=untrained,
                            ttt_demo_loss_before=_mean([r[1] for r in scored]),
                            ttt_demo_loss_after=_mean([r[2] for r in scored]))
    return reports, summary
