"""``tinyonn-eval``: score a training checkpoint on ARC tasks (augmentation voting, pass@2).

Any family: DynTRM generates with its KV cache and per-row adaptive depth (``model.halting``),
SPL, DynONN and a DynTRM with an expert pool by recomputing their forward per token with the
extras the checkpoint saved (the live-expert pools). The report includes the mean refinement
steps used (DynTRM's KV-cache path).

    tinyonn-eval --workdir DIR [--step N] [--source arc1|arc2|PATH] [--split train|eval]
                 [--max-tasks K] [--views V] [--max-new-tokens N] [--ttt-steps N [--ttt-lr LR]]
                 [--out report.json] [--print-config] [--debug]

Reads ``DIR/checkpoints`` (written by ``tinyonn-train``) without modifying it, so it can run next
to a live training run. Prints a per-test-pair table and the aggregate, and writes a JSON report
(default ``DIR/eval_step<N>.json``). ``--print-config`` prints the checkpoint's config as JSON and
stops.

The generation budget ``--max-new-tokens`` is a constant (default
``eval.generate.DEFAULT_MAX_NEW_TOKENS``), never derived from an answer; a budget below
``tokenizer.max_answer_tokens()`` (what the largest legal answer, a 30x30 grid, needs) is
refused. ``--ttt-steps N`` fine-tunes a copy of the parameters on each task's demonstrations
for N steps before generating its views (``eval.ttt``, learning rate ``--ttt-lr``, default the
checkpoint's ``optim.learning_rate``); the aggregate and the report give the seconds per task.

When a test pair of the evaluated tasks is also a pair the checkpoint's config trains on (for
example a run on the ARC-AGI-2 training set evaluated on ARC-AGI-1's evaluation set, which that
training set contains), a warning names how many (``data.protocol.warn_if_config_leaks``).

Everything that can be checked before generation is: the checkpoint, the generation budget
against ``model.max_len`` (DynTRM), the tasks (at least one test pair with a known answer) and
the report path (its directory is created and must accept a new file). The report is written
to a temporary file in that directory and moved over ``--out`` with ``os.replace``, so an
existing report is either kept whole or replaced whole.

A problem with the input (flags, workdir, checkpoint, tasks, report path) is a ``UserError``:
one line ``tinyonn-eval: <what> (<field or path>)`` on stderr and exit code 2, its traceback only
with ``--debug``. Any other exception is a bug and keeps its traceback (with ``--debug`` JAX's
traceback filtering is off as well).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import jax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from tinyonn_jax import train_state, validate
from tinyonn_jax.checkpoint import Checkpointer
from tinyonn_jax.config import Config
from tinyonn_jax.data.protocol import warn_if_config_leaks
from tinyonn_jax.data.tasks import load_tasks
from tinyonn_jax.data.tokenizer import max_answer_tokens
from tinyonn_jax.errors import UserError, user_error_message
from tinyonn_jax.eval.evaluate import (
    EvalAggregate,
    EvalTestReport,
    evaluate_tasks,
    prompt_limit,
)
from tinyonn_jax.eval.generate import DEFAULT_MAX_NEW_TOKENS
from tinyonn_jax.families.registry import get_family
from tinyonn_jax.runtime import configure_compile_cache, configure_xla_cpu
from tinyonn_jax.workdir import write_atomic

PROG = "tinyonn-eval"


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``e``'s message on one line, cut at ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of ``tinyonn-eval``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="the training run's directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--source", default=None,
                   help="arc1 | arc2 | a directory/file of task JSON (default: the run's source)")
    p.add_argument("--split", choices=("train", "eval"), default="eval")
    p.add_argument("--max-tasks", type=int, default=0, help="first K tasks only (0 = all)")
    p.add_argument("--views", type=int, default=8, help="augmented views per test pair")
    p.add_argument("--seed", type=int, default=0, help="seed of the view sampling")
    p.add_argument("--batch-size", type=int, default=8, help="generation rows per call")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="generation budget per answer (a constant; never the answer's size; "
                        f">= {max_answer_tokens()}, what a 30x30 answer needs)")
    p.add_argument("--ttt-steps", type=int, default=0,
                   help="test-time training steps per task on its demonstrations (0 = off)")
    p.add_argument("--ttt-lr", type=float, default=None,
                   help="test-time training learning rate (default: the checkpoint's "
                        "optim.learning_rate)")
    p.add_argument("--out", default=None, help="JSON report (default: WORKDIR/eval_step<N>.json)")
    p.add_argument("--print-config", action="store_true",
                   help="print the checkpoint's config as JSON and exit without generating")
    p.add_argument("--debug", action="store_true",
                   help="tracebacks for user errors too, JAX traceback filtering off")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache directory (default: the "
                        "TINYONN_COMPILE_CACHE environment variable; none without it)")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    """Range checks of the numeric flags."""
    for flag, value, low in (("--views", args.views, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-tasks", args.max_tasks, 0),
                             ("--ttt-steps", args.ttt_steps, 0)):
        if value < low:
            raise UserError(f"must be >= {low}, got {value} ({flag})")
    if args.max_new_tokens < max_answer_tokens():
        raise UserError(f"must be >= {max_answer_tokens()}, the budget the largest legal answer "
                        f"(a 30x30 grid) needs, got {args.max_new_tokens} (--max-new-tokens)")
    if args.ttt_lr is not None and not 0.0 < args.ttt_lr < float("inf"):
        raise UserError(f"must be a finite number > 0, got {args.ttt_lr} (--ttt-lr)")


def restore(workdir: Path, step: int | None) -> tuple[dict, Any, Config, int]:
    """Parameters, family extras, config and step of a checkpoint in ``workdir/checkpoints``.

    The config saved with the step names the family and defines the train-state template
    (``family.init_state`` with ``family.build_optimizer``, as the training program builds
    it); the evaluation parameters (the EMA when kept) and the family's extras are returned.
    Every failure is a ``UserError`` naming the path.
    """
    if not workdir.is_dir():
        raise UserError(f"workdir does not exist ({workdir})")
    ckdir = workdir / "checkpoints"
    if not ckdir.is_dir():
        raise UserError(f"no checkpoint directory; is {workdir} the --workdir of a "
                        f"tinyonn-train run? ({ckdir})")
    with Checkpointer(ckdir, read_only=True) as ckpt:
        steps = ckpt.all_steps()
        if not steps:
            raise UserError(f"no finished checkpoint ({ckdir})")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise UserError(f"no checkpoint for step {step}; available steps: {steps} "
                            f"({ckdir})")
        where = f"{ckdir}/{step}"
        try:
            cfg = Config.from_dict(ckpt.restore_config(step))
        except (TypeError, ValueError) as e:
            raise UserError(f"bad config stored in the checkpoint: {_one_line(e)} "
                            f"({where})") from e
        family = get_family(cfg)
        key = jax.random.key(cfg.train.seed)
        optimizer = family.build_optimizer(cfg)
        template = jax.eval_shape(lambda k: family.init_state(cfg, optimizer, k), key)
        try:
            state, _, _ = ckpt.restore(template, step=step)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"the saved train state does not match the one its config builds: "
                            f"{_one_line(e)} ({where})") from e
    try:
        validate.check_params(state.params, cfg.model, validate.param_layout(template.params))
    except ValueError as e:
        raise UserError(f"the saved parameters do not fit the saved config: {_one_line(e)} "
                        f"({where})") from None
    return train_state.eval_params(state), state.extras, cfg, step


def check_report_path(out: Path) -> None:
    """Fail unless a report can be written to ``out``: creates its directory, tries a file there."""
    if out.is_dir():
        raise UserError(f"the report path is a directory ({out})")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"):
            pass
    except OSError as e:
        raise UserError(f"cannot write the report: {_one_line(e)} ({out})") from e


def _table(reports: list[EvalTestReport], agg: EvalAggregate) -> tuple[Table, Table]:
    per = Table(title="test pairs")
    for col in ("task", "test", "pass@2", "top-1", "votes", "views", "malformed", "skipped"):
        per.add_column(col, justify="left" if col == "task" else "right")
    for r in reports:
        per.add_row(r.task_id, str(r.test_index), "yes" if r.pass2 else "-",
                    "yes" if r.top1 else "-", " ".join(map(str, r.top_votes)) or "-",
                    str(r.n_views), str(r.n_malformed), str(r.n_skipped))
    tot = Table(title="aggregate")
    tot.add_column("metric")
    tot.add_column("value", justify="right")
    steps = agg.mean_refinement_steps
    rows = [*agg.table().items(), ("tasks", agg.n_tasks), ("test pairs", agg.n_pairs),
            ("views skipped (too long)", agg.n_views_skipped),
            ("pairs without answer", agg.n_pairs_unscored),
            ("mean refinement steps", "-" if steps is None else f"{steps:.2f}")]
    if agg.ttt_steps:
        def fmt(v: float | None, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        rows += [("ttt steps", agg.ttt_steps),
                 ("ttt seconds per task", fmt(agg.ttt_seconds_per_task, ".2f")),
                 ("ttt tasks not adapted", agg.ttt_tasks_untrained),
                 ("ttt demo loss before", fmt(agg.ttt_demo_loss_before, ".4f")),
                 ("ttt demo loss after", fmt(agg.ttt_demo_loss_after, ".4f"))]
    for k, v in rows:
        tot.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return per, tot


def run(args: argparse.Namespace) -> int:
    """Restore, check everything checkable, generate, print the tables, write the report."""
    _check_args(args)
    workdir = Path(args.workdir)
    params, extras, cfg, step = restore(workdir, args.step)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        prompt_limit(cfg, args.max_new_tokens)
    except ValueError as e:
        raise UserError(f"model.max_len={cfg.model.max_len} of the checkpoint leaves no room for "
                        f"a prompt next to --max-new-tokens={args.max_new_tokens}: train with "
                        f"--set model.max_len above {args.max_new_tokens} or lower "
                        f"--max-new-tokens (model.max_len, --max-new-tokens)") from e
    source = args.source or cfg.data.source
    try:
        tasks = load_tasks(source, args.split, max_tasks=args.max_tasks)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tasks: {_one_line(e)} ({source}, --split "
                        f"{args.split})") from e
    if len(tasks) == 0:
        raise UserError(f"no tasks to evaluate ({source}, --split {args.split})")
    if not any(truth is not None for task in tasks for _, truth in task.test):
        raise UserError(f"none of the {len(tasks)} tasks has a test pair with a known answer "
                        f"({source}, --split {args.split})")
    with warnings.catch_warnings(record=True) as caught:  # e.g. ARC-AGI-2 train vs ARC-AGI-1 eval
        warnings.simplefilter("always")
        warn_if_config_leaks(cfg, tasks)
    for w in caught:  # on stdout: stderr carries only the one line of a user error
        print(f"{PROG}: warning: {w.message}")
    out = Path(args.out) if args.out else workdir / f"eval_step{step}.json"
    check_report_path(out)
    console = Console()
    ttt = f", {args.ttt_steps} test-time training steps per task" if args.ttt_steps else ""
    console.print(f"step {step} of {workdir}: {len(tasks)} tasks from {source}/{args.split}, "
                  f"{args.views} views each{ttt}")
    with Progress("generating", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        job = bar.add_task("generating", total=None)
        reports, agg = evaluate_tasks(
            params, cfg, tasks, num_views=args.views, seed=args.seed, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, extras=extras, ttt_steps=args.ttt_steps,
            ttt_lr=args.ttt_lr,
            progress=lambda done, total: bar.update(job, completed=done, total=total))
    for t in _table(reports, agg):
        console.print(t)
    report = {
        "workdir": str(workdir), "step": step, "source": source, "split": args.split,
        "num_views": args.views, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
        "ttt_steps": args.ttt_steps, "ttt_lr": args.ttt_lr,
        "tasks_skipped_at_load": tasks.report.num_skipped,
        "aggregate": dataclasses.asdict(agg),
        "reports": [r.to_dict() for r in reports],
        "config": cfg.to_dict(),
    }
    try:
        write_atomic(out, json.dumps(report, indent=2))
    except OSError as e:
        raise UserError(f"cannot write the report: {_one_line(e)} ({out})") from e
    console.print(f"report written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tinyonn-eval``: 0 on success; a ``UserError`` exits with code 2.

    The user error is printed as one line ``tinyonn-eval: <message>`` on stderr (after its
    traceback with ``--debug``); other exceptions propagate.
    """
    args = parse_args(argv)
    configure_xla_cpu()  # before JAX starts its backends
    if args.debug:
        jax.config.update("jax_traceback_filtering", "off")
    try:
        configure_compile_cache(args.compile_cache)  # before the first compilation
        return run(args)
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    sys.exit(main())
