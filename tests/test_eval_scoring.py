"""Scoring: exact match, vote ranking, pass@2, and an oracle run whose score is known by hand."""

from __future__ import annotations

import json

import numpy as np

from tinyonn_jax.data.augment import sample_views
from tinyonn_jax.data.tasks import Task, load_tasks
from tinyonn_jax.eval.scoring import (
    Aggregate,
    Candidate,
    aggregate,
    exact_match,
    pass_at_2,
    score_test,
    vote,
)

A = np.array([[1, 2], [3, 4]], np.int8)
B = np.array([[1, 2], [3, 5]], np.int8)
C = np.array([[1, 2, 3, 4]], np.int8)  # same values as A, other shape


def test_exact_match() -> None:
    assert exact_match(A, A.copy()) and exact_match(A.astype(np.int64), A)
    assert not exact_match(B, A) and not exact_match(C, A) and not exact_match(None, A)
    assert not exact_match(A.T, A)


def test_vote_ranks_by_votes_then_logprob_then_order() -> None:
    preds = [(B, -1.0), (A, -3.0), (None, 0.0), (A, -5.0), (C, -0.5), (B, -2.0), (C, -0.1)]
    # votes: B 2 (mean -1.5), A 2 (mean -4), C 2 (mean -0.3)  -> C, B, A
    ranked = vote(preds, top_k=3)
    assert [c.votes for c in ranked] == [2, 2, 2]
    assert [c.mean_logprob for c in ranked] == [-0.3, -1.5, -4.0]
    assert exact_match(ranked[0].grid, C) and exact_match(ranked[2].grid, A)
    assert len(vote(preds)) == 2
    tie = vote([(A, -1.0), (B, -1.0)])  # full tie: first appearance wins
    assert exact_match(tie[0].grid, A)
    assert vote([(None, -1.0)]) == [] and vote([]) == []


def test_pass_at_2_uses_only_the_first_two() -> None:
    cands = [Candidate(B, 3, -1.0), Candidate(C, 2, -1.0), Candidate(A, 1, -1.0)]
    assert not pass_at_2(cands, A)
    assert pass_at_2(cands[1:], A) and pass_at_2([B, A], A) and not pass_at_2([], A)


def noise(truth: np.ndarray, k: int) -> np.ndarray:
    """Wrong grid number k: distinct for every k and never equal to ``truth``."""
    out = np.full((truth.shape[0] + 1 + k % 3, truth.shape[1]), k % 10, np.int8)
    out[0, 0] = (k // 10) % 10
    return out


def fake_model(task: Task, n_views: int, behaviour: dict[int, tuple]) -> list[tuple]:
    """Answer test pair 0 under ``n_views`` views; ``behaviour[v]`` says what view v returns.

    ("right", lp): the augmented task's true answer; ("grid", g, lp): the original-frame grid g
    as seen in that view's frame; ("noise", k, lp): noise grid k in the view frame;
    ("bad",): a malformed generation. Every grid is mapped back with ``view.invert_grid``.
    """
    views = sample_views(task, n_views, np.random.default_rng(0), include_identity=True)
    truth = task.test[0][1]
    preds = []
    for v, view in enumerate(views):
        kind, *args = behaviour[v]
        aug = view.apply(task)
        if kind == "right":
            pred, lp = aug.test[0][1], args[0]
        elif kind == "grid":
            pred, lp = view.apply_grid(args[0]), args[1]
        elif kind == "noise":
            pred, lp = view.apply_grid(noise(truth, args[0])), args[1]
        else:
            preds.append((None, -1.0))
            continue
        preds.append((view.invert_grid(pred), lp))
    return preds


def test_oracle_voting_score_matches_hand_computation() -> None:
    tasks = [t for t in load_tasks("arc1", "eval") if len(t.test) == 1][:6]
    n = 8
    noisy = lambda first, lp: {v: ("noise", 100 + v, lp) for v in range(first, n)}  # noqa: E731
    scenarios = []
    # 0: three right views, five distinct noise grids -> truth has 3 votes: top1 and pass@2.
    scenarios.append({**noisy(3, -0.1), 0: ("right", -2.0), 1: ("right", -2.0), 2: ("right", -3)})
    # 1: one right view (lp -0.1); a wrong grid W twice; five 1-vote noise grids at lp -5.
    #    Ranking W (2 votes), then truth (best lp among 1-vote grids) -> pass@2, not top1.
    w = noise(tasks[1].test[0][1], 7)
    scenarios.append(
        {**noisy(3, -5.0), 0: ("right", -0.1), 1: ("grid", w, -9.0), 2: ("grid", w, -9.0)}
    )
    # 2: one right view; two wrong grids with two votes each -> truth ranks third: fail.
    w1, w2 = noise(tasks[2].test[0][1], 1), noise(tasks[2].test[0][1], 2)
    scenarios.append(
        {
            **noisy(5, -5.0),
            0: ("right", 0.0),
            1: ("grid", w1, -9.0),
            2: ("grid", w1, -9.0),
            3: ("grid", w2, -9.0),
            4: ("grid", w2, -9.0),
        }
    )
    # 3: no right view: fail.
    scenarios.append(noisy(0, -1.0))
    # 4: every generation malformed: fail, 8 malformed views.
    scenarios.append({v: ("bad",) for v in range(n)})
    # 5: one right view (lp -1) against 1-vote noise at lp -2 -> truth first: top1 and pass@2.
    scenarios.append({**noisy(1, -2.0), 0: ("right", -1.0)})

    reports = []
    for task, behaviour in zip(tasks, scenarios, strict=True):
        preds = fake_model(task, n, behaviour)
        reports.append(score_test(task.task_id, 0, preds, task.test[0][1]))
    assert [r.pass2 for r in reports] == [True, True, False, False, False, True]
    assert [r.top1 for r in reports] == [True, False, False, False, False, True]
    assert reports[0].top_votes == [3, 1] and reports[1].top_votes == [2, 1]
    assert reports[4].n_malformed == 8 and reports[4].top_votes == []

    agg = aggregate(reports)
    assert agg.n_tasks == agg.n_pairs == 6
    assert agg.task_score == agg.pair_pass2 == 3 / 6 and agg.task_solved == 3 / 6
    assert agg.pair_top1 == 2 / 6
    assert agg.malformed_rate == 8 / 48
    assert agg.solved_task_ids == sorted(tasks[i].task_id for i in (0, 1, 5))


def test_task_score_averages_pairs_within_a_task() -> None:
    right = [(A, -1.0)]
    reports = [
        score_test("t1", 0, right, A),
        score_test("t1", 1, right, B),
        score_test("t2", 0, right, A),
    ]
    agg = aggregate(reports)
    # t1 solves 1 of 2 pairs (0.5), t2 solves its only pair (1.0).
    assert agg.task_score == 0.75 and agg.task_solved == 0.5 and agg.pair_pass2 == 2 / 3
    assert agg.solved_task_ids == ["t2"]
    assert set(agg.table()) == {
        "eval/task_score",
        "eval/task_solved",
        "eval/pair_pass2",
        "eval/pair_top1",
        "eval/malformed_rate",
    }
    assert json.loads(agg.to_json())["task_score"] == 0.75
    json.dumps([r.to_dict() for r in reports])
    assert aggregate([]) == Aggregate()
