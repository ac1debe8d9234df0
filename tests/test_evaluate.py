"""evaluate_tasks: voting over views with an oracle generator, skipping, and one real run."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import tiny_model_config

from tinyonn_jax.config import Config
from tinyonn_jax.data import augment, tokenizer
from tinyonn_jax.data.tasks import Task, load_tasks
from tinyonn_jax.eval import evaluate
from tinyonn_jax.eval.generate import Generation
from tinyonn_jax.eval.recompute import FamilyLogits
from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm.lifecycle import PoolState as Pool
from tinyonn_jax.families.registry import get_family

VIEWS = 8
SEED = 3


def _grid(rows):
    g = np.array(rows, np.int8)
    g.setflags(write=False)
    return g


def _task() -> Task:
    """A small asymmetric task (many colours) with two test pairs, so every view differs."""
    train = ((_grid([[1, 2, 0], [3, 0, 4]]), _grid([[4, 0, 3], [0, 2, 1]])),
             (_grid([[5, 0], [6, 7], [0, 8]]), _grid([[8, 0], [7, 6], [0, 5]])))
    test = ((_grid([[1, 0, 2], [3, 4, 5]]), _grid([[5, 4, 3], [2, 0, 1]])),
            (_grid([[6, 7], [0, 9]]), _grid([[9, 0], [7, 6]])))
    return Task(task_id="oracle_task", train=train, test=test, source="test")


def _wrong(truth: np.ndarray, k: int) -> np.ndarray:
    g = np.array(truth)
    g[0, 0] = (g[0, 0] + k) % 10
    return g


def _oracle(table: dict[bytes, tuple[np.ndarray, float]]):
    """A stand-in for ``generate``: looks each prompt up and returns the scripted answer.

    Row r of a call reports r + 1 refinement steps.
    """

    def fake_generate(params, tokens, lengths, cfg, *, max_new_tokens, live=None,
                      stop_hopeless=False):
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        out = np.zeros((len(tokens), max_new_tokens), np.int32)
        ns, lps = np.zeros(len(tokens), np.int32), np.zeros(len(tokens), np.float32)
        for r in range(len(tokens)):
            answer, lp = table[tokens[r, tokens.shape[1] - lengths[r]:].tobytes()]
            out[r, :len(answer)], ns[r], lps[r] = answer, len(answer), lp
        return Generation(out, ns, lps, steps=np.arange(1, len(tokens) + 1, dtype=np.int32))

    return fake_generate


def _script(task: Task, plan: dict[int, list[tuple[str, float]]]):
    """Prompt -> answer tokens for every (test pair, view), from a per-view plan.

    Kinds: ``ok`` (the true answer), ``wrongK`` (a fixed wrong grid K), ``bad`` (malformed),
    ``nostop`` (the true answer but no stop token: an unfinished generation).
    """
    views = augment.sample_views(task, VIEWS, evaluate.task_rng(SEED, task.task_id),
                                 include_identity=True)
    table = {}
    for ti, kinds in plan.items():
        truth = task.test[ti][1]
        for view, (kind, lp) in zip(views, kinds, strict=True):
            prompt = tokenizer.serialize_prompt(view.apply(task), ti)
            if kind == "bad":
                answer = np.array([tokenizer.NEWLINE, tokenizer.IM_END])
            else:
                grid = truth if kind in ("ok", "nostop") else _wrong(truth, int(kind[5:]))
                answer = tokenizer.grid_to_tokens(view.apply_grid(grid))
                if kind != "nostop":
                    answer = np.append(answer, tokenizer.IM_END)
            table[prompt.tobytes()] = (answer, lp)
    assert len(table) == VIEWS * len(plan)  # all prompts distinct: the oracle is unambiguous
    return table


def _cfg() -> Config:
    return Config(model=tiny_model_config())


def test_votes_decide_the_score(monkeypatch):
    task = _task()
    plan = {
        # 5 votes for one wrong grid, 3 for the truth: truth is 2nd -> pass@2, not top-1.
        0: [("ok", -1.0)] * 3 + [("wrong1", -0.1)] * 5,
        # Three grids with 2 votes each plus 2 malformed: the tie goes by mean log-prob and the
        # truth (lowest) is third -> not solved.
        1: [("ok", -3.0), ("ok", -3.0), ("wrong1", -1.0), ("wrong1", -1.0),
            ("wrong2", -2.0), ("wrong2", -2.0), ("bad", 0.0), ("nostop", 0.0)],
    }
    monkeypatch.setattr(evaluate, "generate", _oracle(_script(task, plan)))
    reports, agg = evaluate.evaluate_tasks({}, _cfg(), [task], num_views=VIEWS, seed=SEED,
                                           batch_size=4)
    r0, r1 = reports
    assert (r0.pass2, r0.top1, r0.top_votes, r0.n_malformed) == (True, False, [5, 3], 0)
    assert (r1.pass2, r1.top1, r1.top_votes, r1.n_malformed) == (False, False, [2, 2], 2)
    assert agg.task_score == 0.5 and agg.task_solved == 0.0
    assert agg.pair_pass2 == 0.5 and agg.malformed_rate == 2 / 16

    # The same votes with the truth's log-prob now the highest: it wins the tie.
    plan[1] = [(k, -0.5 if k == "ok" else lp) for k, lp in plan[1]]
    monkeypatch.setattr(evaluate, "generate", _oracle(_script(task, plan)))
    reports, agg = evaluate.evaluate_tasks({}, _cfg(), [task], num_views=VIEWS, seed=SEED,
                                           batch_size=4)
    assert reports[1].pass2 and reports[1].top1
    assert agg.task_score == 1.0 and agg.solved_task_ids == ["oracle_task"]


def test_identity_view_alone_can_solve(monkeypatch):
    task = _task()
    plan = {ti: [("ok", -1.0)] + [("bad", 0.0)] * (VIEWS - 1) for ti in (0, 1)}
    monkeypatch.setattr(evaluate, "generate", _oracle(_script(task, plan)))
    reports, agg = evaluate.evaluate_tasks({}, _cfg(), [task], num_views=VIEWS, seed=SEED)
    assert all(r.top1 and r.top_votes == [1] and r.n_malformed == VIEWS - 1 for r in reports)
    assert agg.task_score == 1.0


def test_mean_refinement_steps_counts_real_rows_only(monkeypatch):
    task = _task()
    plan = {ti: [("ok", -1.0)] * VIEWS for ti in (0, 1)}
    monkeypatch.setattr(evaluate, "generate", _oracle(_script(task, plan)))
    views = augment.sample_views(task, VIEWS, evaluate.task_rng(SEED, task.task_id),
                                 include_identity=True)
    lengths = [len(tokenizer.serialize_prompt(v.apply(task), ti)) for ti in (0, 1) for v in views]
    assert len({evaluate.bucket_length(n, 64, 4000) for n in lengths}) == 1  # one bucket
    # 16 views in chunks of 10 and 6; the 6 are padded to 8 rows with 2 filler rows.
    _, agg = evaluate.evaluate_tasks({}, _cfg(), [task], num_views=VIEWS, seed=SEED,
                                     batch_size=10)
    real = list(range(1, 11)) + list(range(1, 7))
    assert agg.mean_refinement_steps == pytest.approx(np.mean(real))
    assert agg.mean_refinement_steps != pytest.approx(np.mean(real + [7, 8]))


def test_too_long_prompts_are_skipped_and_counted(monkeypatch):
    task = _task()
    plan = {ti: [("ok", -1.0)] * VIEWS for ti in (0, 1)}
    monkeypatch.setattr(evaluate, "generate", _oracle(_script(task, plan)))
    # Under every view the pair-1 prompt is shorter than the pair-0 prompt (the demonstrations
    # keep their total length under transposition); allow exactly the longest pair-1 prompt.
    views = augment.sample_views(task, VIEWS, evaluate.task_rng(SEED, task.task_id),
                                 include_identity=True)
    n0, n1 = ([len(tokenizer.serialize_prompt(v.apply(task), ti)) for v in views] for ti in (0, 1))
    assert max(n1) < min(n0)
    budget = 10
    cfg = Config(model=tiny_model_config(max_len=max(n1) + budget))
    reports, agg = evaluate.evaluate_tasks({}, cfg, [task], num_views=VIEWS, seed=SEED,
                                           max_new_tokens=budget)
    assert reports[0].n_skipped == VIEWS and reports[0].n_views == 0 and not reports[0].pass2
    assert reports[1].n_skipped == 0 and reports[1].n_views == VIEWS and reports[1].top1
    assert agg.n_views_skipped == reports[0].n_skipped + reports[1].n_skipped
    assert agg.task_score == 0.5


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_views"):
        evaluate.evaluate_tasks({}, _cfg(), [_task()], num_views=0)
    with pytest.raises(ValueError, match="max_len"):
        evaluate.evaluate_tasks({}, Config(model=tiny_model_config(max_len=100)), [_task()],
                                max_new_tokens=100)


def test_bucket_length():
    assert evaluate.bucket_length(10, 64, 3000) == 64
    assert evaluate.bucket_length(65, 64, 3000) == 128
    assert evaluate.bucket_length(2049, 64, 3000) == 3000


def test_end_to_end_on_real_tasks():
    tasks = load_tasks("arc1", "train")
    small = sorted(tasks, key=lambda t: len(tokenizer.serialize_prompt(t, 0)))[:2]
    cfg = _cfg()
    params = modules.init_params(jax.random.key(0), cfg.model)
    seen = []
    reports, agg = evaluate.evaluate_tasks(params, cfg, small, num_views=2, batch_size=4,
                                           max_new_tokens=24,
                                           progress=lambda d, n: seen.append((d, n)))
    assert len(reports) == sum(len(t.test) for t in small)
    assert all(r.n_views + r.n_skipped == 2 for r in reports)
    assert agg.n_tasks == 2 and 0.0 <= agg.task_score <= 1.0
    assert agg.mean_refinement_steps == cfg.model.max_refinement_steps  # the head never halts
    assert seen and seen[-1][0] == seen[-1][1] == sum(r.n_views for r in reports)
    assert set(reports[0].to_dict()) >= {"task_id", "pass2", "top1", "n_skipped"}


_POOL = Pool(*[None] * len(Pool._fields))._replace(live={"ffn": "mask"})


@pytest.mark.parametrize("family,extras,kv_cache", [
    ("dyntrm", None, True), ("dyntrm", _POOL, True), ("spl", 0.0, False),
    ("dynonn", "pool", False)])
def test_generator_per_family(monkeypatch, family, extras, kv_cache):
    """The KV-cache decoder for DynTRM (with a pool's live masks); recomputation of
    ``family.logits`` with the extras for every other family."""
    calls = []
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: calls.append(("kv", a, k)))
    monkeypatch.setattr(evaluate, "generate_by_recompute",
                        lambda *a, **k: calls.append(("recompute", a, k)))
    cfg = _cfg() if family == "dyntrm" else Config(family=family)
    evaluate.make_generator("params", cfg, extras)("tokens", "lengths", 5)
    (kind, args, kwargs), = calls
    assert kind == ("kv" if kv_cache else "recompute")
    live = None if extras is None else getattr(extras, "live", None)
    # Evaluation stops hopeless answers (eval.grammar): the same scores, a shorter tail.
    assert kwargs == ({"max_new_tokens": 5, "live": live, "stop_hopeless": True} if kv_cache
                      else {"max_new_tokens": 5, "stop_hopeless": True})
    if kv_cache:
        assert args == ("params", "tokens", "lengths", cfg.model)
    else:
        fn, state, *rest = args
        assert fn == FamilyLogits(get_family(cfg), cfg) and state == ("params", extras)
        assert rest == ["tokens", "lengths"]
