"""Test-time training: the base state is untouched, the demonstrations' loss drops, the scanned
steps equal the unrolled ones, one compilation per bucket, and TTT inside ``evaluate_tasks``."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from conftest import tiny_model_config

from tinyonn_jax import train_state
from tinyonn_jax.config import Config, DataConfig
from tinyonn_jax.data import tokenizer
from tinyonn_jax.data.tasks import Task, load_tasks
from tinyonn_jax.eval import evaluate, ttt
from tinyonn_jax.families.registry import get_family

STEPS = 4
LR = 3e-3
# Two demonstrations each, short sequences: 6150a2bd fits the 64 bucket, the other two 128.
TASK_IDS = ("6150a2bd", "e9afcf9a", "d631b094")


@functools.cache
def _tasks() -> dict[str, Task]:
    return {t.task_id: t for t in load_tasks("arc1", "train") if t.task_id in TASK_IDS}


def _cfg(**data) -> Config:
    kw = dict(batch_size=2, views_per_task=2, min_bucket=64, max_len=256)
    kw.update(data)
    return Config(model=tiny_model_config(), data=DataConfig(**kw))


def _init(cfg: Config):
    return get_family(cfg).init(jax.random.key(0), cfg)


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_base_params_unchanged_and_adapted_differ():
    cfg = _cfg()
    params, extras = _init(cfg)
    before = _host(params)
    task = _tasks()["6150a2bd"]
    a = ttt.adapt(params, extras, cfg, task, steps=STEPS, lr=LR)
    assert a.trained and a.reason == "" and a.losses.shape == (STEPS,)
    assert np.isfinite(a.losses).all() and a.skipped_updates == 0 and a.seconds > 0
    # Bitwise the same values, and the buffers are still alive (nothing was donated).
    jax.tree.map(np.testing.assert_array_equal, _host(params), before)
    assert np.isfinite(ttt.demo_loss(params, extras, cfg, task))
    changed = jax.tree.leaves(jax.tree.map(
        lambda p, q: not np.array_equal(np.asarray(p), q), a.params, before))
    assert any(changed)
    assert jax.tree.structure(a.params) == jax.tree.structure(params)


def test_ttt_lowers_the_demonstration_loss():
    cfg = _cfg()
    params, extras = _init(cfg)
    task = _tasks()["6150a2bd"]
    a = ttt.adapt(params, extras, cfg, task, steps=STEPS, lr=LR)
    before = ttt.demo_loss(params, extras, cfg, task)
    after = ttt.demo_loss(a.params, a.extras, cfg, task)
    assert after < 0.95 * before, (before, after)


def test_scan_equals_unrolled_steps():
    cfg = _cfg()
    params, extras = _init(cfg)
    task = _tasks()["6150a2bd"]
    a = ttt.adapt(params, extras, cfg, task, steps=STEPS, lr=LR, seed=3)
    assert a.losses.shape == (STEPS,)

    tcfg = ttt.ttt_config(cfg, LR)
    batches, _ = ttt.ttt_batches(tcfg, task, STEPS, seed=3)
    assert batches["inputs"].shape == (STEPS, cfg.data.batch_size, a.length)
    family = get_family(tcfg)
    optimizer = family.build_optimizer(tcfg)
    step = jax.jit(functools.partial(train_state.train_step, family=family, cfg=tcfg,
                                     optimizer=optimizer))
    state = train_state.init_state(ttt.copy_tree(params), ttt.copy_tree(extras), optimizer, 0.0)
    losses = []
    for i in range(STEPS):
        state, m = step(state, {k: v[i] for k, v in batches.items()})
        losses.append(float(m["train/main_loss"]))
    np.testing.assert_allclose(a.losses, losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 _host(a.params), _host(state.params))


def test_one_compilation_per_bucket(monkeypatch):
    cfg = _cfg()
    params, extras = _init(cfg)
    tasks = _tasks()
    lengths = {i: ttt.ttt_batches(ttt.ttt_config(cfg, LR), tasks[i], STEPS)[0]["inputs"].shape
               for i in TASK_IDS}
    assert lengths["e9afcf9a"] == lengths["d631b094"] != lengths["6150a2bd"]
    traces = []
    real = train_state.train_step

    def counting(*args, **kwargs):
        traces.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ttt.train_state, "train_step", counting)
    ttt._adapt_fn.cache_clear()  # a fresh jitted function: every compilation is traced here
    for task_id in ("e9afcf9a", "d631b094"):  # same bucket: traced once
        ttt.adapt(params, extras, cfg, tasks[task_id], steps=STEPS, lr=LR)
    assert len(traces) == 1
    ttt.adapt(params, extras, cfg, tasks["6150a2bd"], steps=STEPS, lr=LR)  # another bucket
    assert len(traces) == 2
    ttt._adapt_fn.cache_clear()  # drop the function holding the counting step


def test_nothing_to_train_returns_the_base_state():
    cfg = _cfg()
    params, extras = _init(cfg)
    task = _tasks()["6150a2bd"]
    a = ttt.adapt(params, extras, cfg, task, steps=0)
    assert not a.trained and a.params is params and a.extras is extras and a.losses.size == 0
    one_demo = dataclasses.replace(task, train=task.train[:1])
    a = ttt.adapt(params, extras, cfg, one_demo, steps=STEPS)
    assert not a.trained and a.params is params and "demonstration" in a.reason
    short = _cfg(max_len=16, min_bucket=8)  # every sequence (54 tokens) is too long
    a = ttt.adapt(params, extras, short, task, steps=STEPS)
    assert not a.trained and a.params is params and "data.max_len=16" in a.reason
    assert a.n_skipped == 2 * short.data.views_per_task
    with pytest.raises(ValueError, match="steps"):
        ttt.adapt(params, extras, cfg, task, steps=-1)
    with pytest.raises(ValueError, match="2 demonstrations"):
        ttt.demo_loss(params, extras, cfg, one_demo)


def test_evaluate_tasks_with_ttt(monkeypatch):
    cfg = _cfg()
    params, extras = _init(cfg)
    before = _host(params)
    tasks = [_tasks()[i] for i in ("6150a2bd", "e9afcf9a")]
    kw = dict(num_views=2, batch_size=2, max_new_tokens=16, seed=1)
    generated = []  # (prompt tokens, generated tokens, mean log-prob) of every call
    real = evaluate.generate

    def recording(params, tokens, lengths, cfg, **k):
        out = real(params, tokens, lengths, cfg, **k)
        generated.append(tuple(np.asarray(x) for x in (tokens, out.tokens, out.mean_logprob)))
        return out

    monkeypatch.setattr(evaluate, "generate", recording)
    reports, agg = evaluate.evaluate_tasks(params, cfg, tasks, ttt_steps=STEPS, ttt_lr=LR, **kw)
    jax.tree.map(np.testing.assert_array_equal, _host(params), before)
    assert len(reports) == 2 and all(r.n_views == 2 for r in reports)
    assert all(r.ttt_seconds > 0 for r in reports)
    assert agg.ttt_steps == STEPS and agg.ttt_tasks_untrained == 0
    assert agg.ttt_seconds_per_task == pytest.approx(np.mean([r.ttt_seconds for r in reports]))
    assert all(r.ttt_demo_loss_after < r.ttt_demo_loss_before for r in reports)
    assert {"ttt_seconds", "ttt_demo_loss_before"} <= set(reports[0].to_dict())
    # TTT inside the evaluation generates what each task's adapted copy generates, one task
    # at a time (each task's 2 views are one call).
    with_ttt, generated[:] = list(generated), []
    for task in tasks:
        a = ttt.adapt(params, extras, cfg, task, steps=STEPS, lr=LR, seed=kw["seed"])
        evaluate.evaluate_tasks(a.params, cfg, [task], extras=a.extras, **kw)
    assert len(with_ttt) == len(generated) == 2
    for got, want in zip(with_ttt, generated, strict=True):
        for x, y in zip(got, want, strict=True):
            np.testing.assert_array_equal(x, y)
    # Without TTT the base parameters generate (other tokens) and no TTT is reported.
    generated[:] = []
    reports, agg = evaluate.evaluate_tasks(params, cfg, tasks[:1], **kw)
    assert reports[0].ttt_seconds is None and agg.ttt_steps == 0
    assert agg.ttt_seconds_per_task is None and agg.ttt_demo_loss_before is None
    assert not np.array_equal(generated[0][2], with_ttt[0][2])
    with pytest.raises(ValueError, match="ttt_steps"):
        evaluate.evaluate_tasks(params, cfg, tasks, ttt_steps=-1)


def test_max_answer_tokens_is_below_the_default_budget():
    from tinyonn_jax.eval.generate import DEFAULT_MAX_NEW_TOKENS

    assert tokenizer.max_answer_tokens() <= DEFAULT_MAX_NEW_TOKENS
