"""Does routing help? Train several configs on the same real ARC tasks, same steps and seeds.

Each task trains on its demonstration pairs only: every training sequence is the task with one
demonstration held out as the pseudo-test (``data.tasks.leave_one_out``: each demonstration in
turn, augmented views on top). The real test pairs are never trained on; they are evaluated at
the end with ``eval.evaluate_tasks`` (greedy generation with a constant budget, exact match of
the top-voted answer, pass@2 with augmentation voting) and with teacher forcing (token accuracy
and loss on the test outputs, also tracked during training for the learning curves).

With ``--ttt-steps N`` every config is also evaluated with test-time training from the same
trained state: for each task a copy of the parameters is fine-tuned N steps on that task's
demonstrations (``eval.ttt.adapt``), then its test pairs are generated and teacher forced with
the copy. Those results are a second row, ``<config>+ttt``, with the seconds of TTT per task
and the demonstrations' loss before and after it.

Configs: ``routed`` = the model of configs/tiny.py; ``dense`` = its parameter-matched dense twin
(MHA + SwiGLU, ``model.dense.match_param_count``); ``routing_off`` = routed with routing mode
"dense" (every expert active with weight 1/P). All share tiny.py's optimizer, SARS and data
settings (SARS is off for the dense twin: it has no routed site). ``--positions rope1d,rope2d``
runs each config with each rotary position mode (``<config>/<mode>``; default: tiny.py's).

Prints one JSON line per config (means over seeds; per-seed values under ``per_seed``), then a
comparison table, and writes the learning curves side by side as a PNG.
Usage: python bench/learning.py [--tasks FILE] [--budget-steps 300] [--seeds 1]
                                [--configs routed,dense,routing_off] [--positions MODES]
                                [--eval-views 4] [--out PATH]
                                [--max-new-tokens 932] [--ttt-steps 0] [--ttt-lr LR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from common import emit

from tinyonn_jax import train_state
from tinyonn_jax.config import Config
from tinyonn_jax.data.batching import BatchStream, pack_sequences
from tinyonn_jax.data.tasks import Task, leave_one_out, load_tasks
from tinyonn_jax.data.tokenizer import max_answer_tokens, sequence_length, serialize_task
from tinyonn_jax.eval import scoring, ttt
from tinyonn_jax.eval.evaluate import evaluate_tasks, ttt_demo_losses
from tinyonn_jax.eval.generate import DEFAULT_MAX_NEW_TOKENS
from tinyonn_jax.families.dyntrm import dense
from tinyonn_jax.families.registry import get_family
from tinyonn_jax.fields import ROPE_MODES
from tinyonn_jax.trainer import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_NAMES = ("routed", "dense", "routing_off")


def make_configs(base: Config, names: list[str],
                 positions: tuple[str, ...]) -> dict[str, Config]:
    """The compared configs, all derived from ``base`` (configs/tiny.py), each with every rotary
    position mode of ``positions`` (named ``<config>/<mode>`` when more than one is compared)."""
    unknown = set(names) - set(CONFIG_NAMES)
    if unknown:
        raise SystemExit(f"--configs: unknown {sorted(unknown)}; choose from {CONFIG_NAMES}")
    bad = set(positions) - set(ROPE_MODES)
    if bad or not positions:
        raise SystemExit(f"--positions: {sorted(bad) or 'none given'}; choose from {ROPE_MODES}")
    out = {}
    for pos in positions:
        m = dataclasses.replace(base.model, rope=pos)
        models = {"routed": m, "dense": dense.match_param_count(m),
                  "routing_off": dataclasses.replace(m, attn_routing="dense",
                                                     ffn_routing="dense")}
        for n in names:
            out[n if len(positions) == 1 else f"{n}/{pos}"] = dataclasses.replace(
                base, model=models[n])
    return out


def select_tasks(path: str | None, n_default: int = 20) -> list[Task]:
    """ARC-AGI-1 training tasks named in ``path`` (one id a line, '#' comments), or the
    ``n_default`` smallest by longest test sequence (ties by id)."""
    tasks = [t for t in load_tasks("arc1", "train") if t.has_test_outputs and len(t.train) >= 2]
    if path is None:
        key = lambda t: (max(sequence_length(t, i) for i in range(len(t.test))), t.task_id)  # noqa: E731
        return sorted(tasks, key=key)[:n_default]
    by_id = {t.task_id: t for t in tasks}
    ids = [ln.split("#")[0].strip() for ln in Path(path).read_text().splitlines()]
    ids = [i for i in ids if i]
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise SystemExit(f"--tasks {path}: not ARC-AGI-1 training tasks with >= 2 "
                         f"demonstrations and known test outputs: {missing}")
    return [by_id[i] for i in ids]


def demo_tasks(tasks: list[Task]) -> list[Task]:
    """Every task's leave-one-out pseudo-tasks (``data.tasks.leave_one_out``)."""
    return [pt for t in tasks for pt in leave_one_out(t)]


def test_batches(tasks: list[Task], cfg: Config) -> list[dict]:
    """Teacher-forcing batches of every real test pair (full demonstrations in the prompt)."""
    seqs = [serialize_task(t, i) for t in tasks for i in range(len(t.test))]
    batches, skipped = pack_sequences(seqs, cfg.data.batch_size, cfg.data.min_bucket,
                                      cfg.data.max_len)
    if skipped:
        print(f"warning: {skipped} test sequences exceed max_len={cfg.data.max_len}",
              file=sys.stderr)
    return batches


class TeacherForced:
    """Sums over test-output tokens (correct, total, NLL) and one exact flag per sequence."""

    def __init__(self) -> None:
        self.correct = self.total = self.nll = 0.0
        self.exact: list[bool] = []

    def metrics(self) -> dict:
        """Token accuracy and CE over all test-output tokens, and the fraction of test outputs
        whose every token is right."""
        return {"test_token_acc": self.correct / max(self.total, 1.0),
                "test_loss": self.nll / max(self.total, 1.0),
                "test_exact_tf": float(np.mean(self.exact)) if self.exact else 0.0}


def teacher_forced(logits_fn, extras, params, batches: list[dict],
                   acc: TeacherForced | None = None) -> dict:
    """Add ``batches`` to ``acc`` (a new one when None) and return its metrics; exactness is
    per packed segment, not per row."""
    acc = TeacherForced() if acc is None else acc
    for b in batches:
        logits = np.asarray(logits_fn(extras, params, b), np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        w, tgt = b["weights"], b["targets"]
        hit = (logits.argmax(-1) == tgt)
        acc.correct += float((hit * w).sum())
        acc.total += float(w.sum())
        acc.nll -= float((np.take_along_axis(logp, tgt[..., None], -1)[..., 0] * w).sum())
        for r in range(w.shape[0]):  # host-side bookkeeping over packed segments
            for k in np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]):
                sel = (b["segment_ids"][r] == k) & (w[r] > 0)
                acc.exact.append(bool(hit[r][sel].all()))
    return acc.metrics()


def evaluate_with_ttt(cfg: Config, params, extras, tasks: list[Task], seed: int, logits_fn,
                      args) -> dict:
    """Test-time training from ``params`` for every task, then generation (pass@2, top-1) and
    teacher forcing on its test pairs with the adapted copy. Returns the ``+ttt`` metrics."""
    acc = TeacherForced()
    reports, seconds, before, after = [], [], [], []
    untrained = 0
    t0 = time.perf_counter()
    for task in tasks:
        a = ttt.adapt(params, extras, cfg, task, steps=args.ttt_steps, lr=args.ttt_lr,
                      seed=seed)
        seconds.append(a.seconds)
        untrained += not a.trained
        loss_before, loss_after = ttt_demo_losses(params, extras, cfg, task, a)
        if loss_before is not None:
            before.append(loss_before)
            after.append(loss_after)
        teacher_forced(logits_fn, a.extras, a.params, test_batches([task], cfg), acc)
        rs, _ = evaluate_tasks(a.params, cfg, [task], extras=a.extras,
                               num_views=args.eval_views, seed=seed, batch_size=8,
                               max_new_tokens=args.max_new_tokens, min_bucket=256)
        reports.extend(rs)
    agg = scoring.aggregate(reports)
    nan = float("nan")
    return {**acc.metrics(), "exact_top1": agg.pair_top1, "pass2": agg.pair_pass2,
            "task_score": agg.task_score, "malformed_rate": agg.malformed_rate,
            "solved": agg.solved_task_ids, "ttt_s_per_task": float(np.mean(seconds)),
            "ttt_untrained": untrained,
            "ttt_demo_loss_before": float(np.mean(before)) if before else nan,
            "ttt_demo_loss_after": float(np.mean(after)) if after else nan,
            "eval_s": time.perf_counter() - t0}


def run_one(name: str, cfg: Config, tasks: list[Task], seed: int, args) -> dict:
    """Train ``cfg`` for ``args.budget_steps`` from seed ``seed``; evaluate; return records."""
    family = get_family(cfg)
    key = jax.random.key(seed)
    optimizer = family.build_optimizer(cfg)
    state = family.init_state(cfg, optimizer, key)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
    step_fn = family.make_train_step(cfg, optimizer)
    stream = BatchStream(demo_tasks(tasks), cfg.data, seed=seed)
    logits_fn = jax.jit(lambda e, p, b: family.logits(p, e, b["inputs"], cfg,
                                                      positions=b["positions"],
                                                      segment_ids=b["segment_ids"]))
    tbatches = test_batches(tasks, cfg)
    curve = {"step": [], "loss": [], "token_acc": []}
    evals = {"step": [], "test_token_acc": [], "test_loss": []}
    t0 = time.perf_counter()
    for i in range(args.budget_steps):
        batch, _ = next(stream)
        state, m = step_fn(state, batch)
        m = jax.device_get({k: m[k] for k in ("train/main_loss", "train/token_acc")})
        curve["step"].append(i + 1)
        curve["loss"].append(float(m["train/main_loss"]))
        curve["token_acc"].append(float(m["train/token_acc"]))
        if (i + 1) % args.eval_every == 0 or i + 1 == args.budget_steps:
            tf = teacher_forced(logits_fn, state.extras, train_state.eval_params(state),
                                tbatches)
            evals["step"].append(i + 1)
            evals["test_token_acc"].append(tf["test_token_acc"])
            evals["test_loss"].append(tf["test_loss"])
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    params = train_state.eval_params(state)
    final_tf = teacher_forced(logits_fn, state.extras, params, tbatches)
    _, agg = evaluate_tasks(params, cfg, tasks, num_views=args.eval_views, seed=seed,
                            batch_size=8, max_new_tokens=args.max_new_tokens, min_bucket=256,
                            extras=state.extras)
    eval_s = time.perf_counter() - t0
    with_ttt = (evaluate_with_ttt(cfg, params, state.extras, tasks, seed, logits_fn, args)
                if args.ttt_steps else None)
    tail = max(1, args.budget_steps // 10)
    return {
        "config": name, "seed": seed, "params": n_params, "steps": args.budget_steps,
        "final_train_loss": float(np.mean(curve["loss"][-tail:])),
        "final_train_token_acc": float(np.mean(curve["token_acc"][-tail:])),
        **final_tf,
        "exact_top1": agg.pair_top1, "pass2": agg.pair_pass2, "task_score": agg.task_score,
        "malformed_rate": agg.malformed_rate, "solved": agg.solved_task_ids,
        "skipped_steps": int(jax.device_get(state.skipped)),
        "train_s": train_s, "eval_s": eval_s,
        "curve": curve, "evals": evals, "ttt": with_ttt,
    }


METRICS = ("final_train_loss", "final_train_token_acc", "test_loss", "test_token_acc",
           "test_exact_tf", "exact_top1", "pass2", "task_score", "malformed_rate", "train_s",
           "eval_s")


def summarize(name: str, cfg: Config, runs: list[dict], args) -> dict:
    """One record per config: means over seeds, per-seed values kept."""
    m = cfg.model
    rec = {"config": name,
           "attn": m.attn_kind if m.attn_kind == "mha" else f"{m.attn_kind}/{m.attn_routing}",
           "ffn": m.ffn_kind if m.ffn_kind == "swiglu" else f"{m.ffn_kind}/{m.ffn_routing}",
           "params": runs[0]["params"],
           "steps": args.budget_steps, "seeds": len(runs), "tasks": args.n_tasks}
    rec.update({k: float(np.mean([r[k] for r in runs])) for k in METRICS})
    rec["step_s"] = rec["train_s"] / args.budget_steps
    rec["solved"] = sorted({t for r in runs for t in r["solved"]})
    rec["per_seed"] = {k: [round(r[k], 4) for r in runs] for k in
                       ("test_token_acc", "exact_top1", "pass2")}
    return rec


TTT_METRICS = ("test_loss", "test_token_acc", "test_exact_tf", "exact_top1", "pass2",
               "task_score", "malformed_rate", "ttt_s_per_task", "ttt_demo_loss_before",
               "ttt_demo_loss_after", "eval_s")


def summarize_ttt(base: dict, runs: list[dict], args) -> dict:
    """The ``<config>+ttt`` record: the test-time-trained evaluation of the same states."""
    ttts = [r["ttt"] for r in runs]
    rec = {k: base[k] for k in ("attn", "ffn", "params", "steps", "seeds", "tasks")}
    rec = {"config": f"{base['config']}+ttt", **rec, "ttt_steps": args.ttt_steps,
           "ttt_lr": args.ttt_lr, "ttt_untrained": sum(t["ttt_untrained"] for t in ttts)}
    rec.update({k: float(np.mean([t[k] for t in ttts])) for k in TTT_METRICS})
    rec["solved"] = sorted({s for t in ttts for s in t["solved"]})
    rec["per_seed"] = {k: [round(t[k], 4) for t in ttts] for k in
                       ("test_token_acc", "exact_top1", "pass2")}
    return rec


def print_table(records: list[dict]) -> None:
    cols = ("config", "params", "final_train_loss", "test_loss", "test_token_acc",
            "test_exact_tf", "exact_top1", "pass2", "step_s")
    if any("ttt_s_per_task" in r for r in records):
        cols += ("ttt_s_per_task", "ttt_demo_loss_before", "ttt_demo_loss_after")

    def cell(r: dict, c: str) -> str:
        v = r.get(c, "-")  # a +ttt row has no training columns, a plain row no TTT columns
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [[cell(r, c) for c in cols] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def plot(curves: dict[str, list[dict]], path: Path, smooth: int) -> None:
    """Train CE, train token accuracy and teacher-forced test token accuracy, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2), dpi=110)
    axes = fig.subplots(1, 3)
    for name, runs in curves.items():
        steps = np.asarray(runs[0]["curve"]["step"])
        for ax, key in zip(axes[:2], ("loss", "token_acc"), strict=True):
            y = np.mean([r["curve"][key] for r in runs], axis=0)
            k = min(smooth, len(y))
            ys = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], ys, label=name)
        ev = np.mean([r["evals"]["test_token_acc"] for r in runs], axis=0)
        axes[2].plot(runs[0]["evals"]["step"], ev, marker="o", label=name)
    titles = (f"train CE (moving mean of {smooth})", "train token accuracy",
              "test-output token accuracy (teacher forced)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=None, help="file of ARC-AGI-1 training task ids")
    p.add_argument("--budget-steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--configs", default="routed,dense,routing_off")
    p.add_argument("--positions", default="",
                   help="rotary position modes to compare, e.g. rope1d,rope2d (default: the "
                        "config's model.rope)")
    p.add_argument("--eval-every", type=int, default=0, help="0 = budget/10")
    p.add_argument("--eval-views", type=int, default=4, help="augmented views for voting")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help="constant generation budget (never the answer's size), at least "
                        f"{max_answer_tokens()} (a 30x30 answer)")
    p.add_argument("--ttt-steps", type=int, default=0,
                   help="also evaluate with N test-time training steps per task (0 = off)")
    p.add_argument("--ttt-lr", type=float, default=None,
                   help="test-time training learning rate (default: optim.learning_rate)")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_learning" / "curves.png"))
    args = p.parse_args()
    if args.budget_steps < 1 or args.seeds < 1:
        raise SystemExit("--budget-steps and --seeds must be >= 1")
    if args.max_new_tokens < max_answer_tokens():
        raise SystemExit(f"--max-new-tokens must be >= {max_answer_tokens()}, the budget the "
                         f"largest legal answer (a 30x30 grid) needs; got {args.max_new_tokens}")
    if args.ttt_steps < 0:
        raise SystemExit(f"--ttt-steps must be >= 0, got {args.ttt_steps}")
    if args.ttt_lr is not None and not 0.0 < args.ttt_lr < float("inf"):
        raise SystemExit(f"--ttt-lr must be a finite number > 0, got {args.ttt_lr}")
    args.eval_every = args.eval_every or max(1, args.budget_steps // 10)
    tasks = select_tasks(args.tasks)
    args.n_tasks = len(tasks)
    base = load_config(ROOT / "configs" / "tiny.py")
    positions = tuple(c.strip() for c in args.positions.split(",") if c.strip())
    configs = make_configs(base, [c.strip() for c in args.configs.split(",") if c.strip()],
                           positions or (base.model.rope,))
    print(f"# {len(tasks)} tasks, {len(demo_tasks(tasks))} demonstration hold-outs, "
          f"{args.budget_steps} steps x {args.seeds} seed(s): {', '.join(configs)}",
          file=sys.stderr)
    records, curves = [], {}
    for name, cfg in configs.items():
        runs = [run_one(name, cfg, tasks, seed, args) for seed in range(args.seeds)]
        curves[name] = runs
        rec = summarize(name, cfg, runs, args)
        records.append(rec)
        emit(rec)
        if args.ttt_steps:
            records.append(summarize_ttt(rec, runs, args))
            emit(records[-1])
    print_table(records)
    out = Path(args.out)
    plot(curves, out, smooth=max(1, args.budget_steps // 20))
    out.with_suffix(".json").write_text(json.dumps(
        {n: [{k: r[k] for k in ("seed", "curve", "evals")} for r in runs]
         for n, runs in curves.items()}))
    print(f"# curves: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
