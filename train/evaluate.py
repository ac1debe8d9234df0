"""``tinyonn-eval``: score a training checkpoint on ARC tasks (augmentation voting, pass@2).

    tinyonn-eval --workdir DIR [--step N] [--source arc1|arc2|PATH] [--split train|eval]
                 [--max-tasks K] [--views V] [--out report.json]

Reads ``DIR/checkpoints`` (written by ``tinyonn-train``) without modifying it, so it can run next
to a live training run. Prints a per-test-pair table and the aggregate, and writes a JSON report
(default ``DIR/eval_step<N>.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from tinyonn_jax import ema as ema_lib
from tinyonn_jax import optim
from tinyonn_jax import step as train_step
from tinyonn_jax.checkpoint import Checkpointer
from tinyonn_jax.config import Config
from tinyonn_jax.data.tasks import load_tasks
from tinyonn_jax.eval.evaluate import EvalAggregate, EvalTestReport, evaluate_tasks
from tinyonn_jax.eval.generate import DEFAULT_MAX_NEW_TOKENS
from tinyonn_jax.model import transformer
from tinyonn_jax.runtime import configure_xla_cpu


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments of ``tinyonn-eval``."""
    p = argparse.ArgumentParser(prog="tinyonn-eval", description=__doc__.splitlines()[0])
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
                   help="generation budget per answer (a constant; never the answer's size)")
    p.add_argument("--out", default=None, help="JSON report (default: WORKDIR/eval_step<N>.json)")
    return p.parse_args(argv)


def _check_params(params: dict, cfg: Config, where: str) -> None:
    """Fail clearly when restored parameters do not fit the model of ``cfg``."""
    expected = jax.eval_shape(lambda: transformer.init_params(jax.random.key(0), cfg.model))
    got_struct, want_struct = jax.tree.structure(params), jax.tree.structure(expected)
    if got_struct != want_struct:
        raise SystemExit(f"tinyonn-eval: parameters in {where} do not match the model of its "
                         f"config:\n  saved:    {got_struct}\n  expected: {want_struct}")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, a), e in zip(flat, jax.tree.leaves(expected), strict=True):
        if tuple(a.shape) != tuple(e.shape):
            raise SystemExit(f"tinyonn-eval: {where}: parameter "
                             f"{jax.tree_util.keystr(path)} has shape {tuple(a.shape)}, "
                             f"the config implies {tuple(e.shape)}")


def restore(workdir: Path, step: int | None) -> tuple[dict, Config, int]:
    """Parameters, config and step of a checkpoint in ``workdir/checkpoints``.

    The config saved with the step defines the train-state template (``step.init_state`` with
    the optimizer of ``optim.build_optimizer``, as the training program builds it); only the
    parameters are returned. Every failure is a ``SystemExit`` with a message naming the path.
    """
    if not workdir.is_dir():
        raise SystemExit(f"tinyonn-eval: workdir {workdir} does not exist")
    ckdir = workdir / "checkpoints"
    if not ckdir.is_dir():
        raise SystemExit(f"tinyonn-eval: no checkpoint directory {ckdir} (is {workdir} the "
                         "--workdir of a tinyonn-train run?)")
    with Checkpointer(ckdir, read_only=True) as ckpt:
        steps = ckpt.all_steps()
        if not steps:
            raise SystemExit(f"tinyonn-eval: no finished checkpoint in {ckdir}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise SystemExit(f"tinyonn-eval: no checkpoint for step {step} in {ckdir}; "
                             f"available steps: {steps}")
        where = f"{ckdir}/{step}"
        try:
            cfg = Config.from_dict(ckpt.restore_config(step))
        except (TypeError, ValueError) as e:
            raise SystemExit(f"tinyonn-eval: bad config stored in {where}: {e}") from e
        family = getattr(cfg.model, "family", "dyntrm")
        if family != "dyntrm":
            raise SystemExit(f"tinyonn-eval: generation supports the dyntrm family, {where} "
                             f"is a {family!r} model")
        key = jax.random.key(cfg.train.seed)
        shapes = jax.eval_shape(lambda k: transformer.init_params(k, cfg.model), key)
        optimizer = optim.build_optimizer(cfg, shapes)
        template = jax.eval_shape(lambda k: train_step.init_state(cfg, optimizer, k), key)
        try:
            state, _, _ = ckpt.restore(template, step=step)
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"tinyonn-eval: the train state in {where} does not match the one "
                             f"its config builds: {e}") from e
    _check_params(state.params, cfg, where)
    return ema_lib.eval_params(state), cfg, step


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
    for k, v in (*agg.table().items(), ("tasks", agg.n_tasks), ("test pairs", agg.n_pairs),
                 ("views skipped (too long)", agg.n_views_skipped),
                 ("pairs without answer", agg.n_pairs_unscored)):
        tot.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return per, tot


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tinyonn-eval``; returns 0, raises ``SystemExit`` with a message on error."""
    args = parse_args(argv)
    configure_xla_cpu()  # before JAX starts its backends
    if args.views < 1 or args.batch_size < 1 or args.max_tasks < 0 or args.max_new_tokens < 1:
        raise SystemExit("tinyonn-eval: --views, --batch-size and --max-new-tokens must be >= 1 "
                         "and --max-tasks >= 0")
    workdir = Path(args.workdir)
    params, cfg, step = restore(workdir, args.step)
    source = args.source or cfg.data.source
    try:
        tasks = load_tasks(source, args.split, max_tasks=args.max_tasks)
    except (OSError, ValueError) as e:
        raise SystemExit(f"tinyonn-eval: cannot load tasks from {source!r}: {e}") from e
    console = Console()
    console.print(f"step {step} of {workdir}: {len(tasks)} tasks from {source}/{args.split}, "
                  f"{args.views} views each")
    with Progress("generating", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        job = bar.add_task("generating", total=None)
        reports, agg = evaluate_tasks(
            params, cfg, tasks, num_views=args.views, seed=args.seed, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=lambda done, total: bar.update(job, completed=done, total=total))
    for t in _table(reports, agg):
        console.print(t)
    out = Path(args.out) if args.out else workdir / f"eval_step{step}.json"
    report = {
        "workdir": str(workdir), "step": step, "source": source, "split": args.split,
        "num_views": args.views, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
        "tasks_skipped_at_load": tasks.report.num_skipped,
        "aggregate": dataclasses.asdict(agg),
        "reports": [r.to_dict() for r in reports],
        "config": cfg.to_dict(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    console.print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
