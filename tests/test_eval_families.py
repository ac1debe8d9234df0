"""``tinyonn-eval`` for every family: a 2-step training run of each tiny config, evaluated by the
CLI; the checkpoint's family extras come back; SPL and DynONN generation by recomputation equals
greedy decoding of each prompt alone."""

from __future__ import annotations

import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyonn_jax import trainer
from tinyonn_jax.config import apply_overrides
from tinyonn_jax.data import tokenizer
from tinyonn_jax.data.tasks import load_tasks
from tinyonn_jax.data.tokenizer import PAD
from tinyonn_jax.eval.generate import left_pad
from tinyonn_jax.eval.recompute import FamilyLogits, generate_by_recompute
from tinyonn_jax.families.registry import get_family
from train import evaluate as cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"dyntrm": ("tiny.py", ["model.num_heads=2", "model.hidden=16",
                                  "model.init_attn_experts=2", "model.init_ffn_experts=2",
                                  "model.num_attn_experts=4", "model.num_ffn_experts=4",
                                  "model.max_refinement_steps=2"]),
           "spl": ("tiny_spl.py", ["model.hidden=16", "model.num_layers=2"]),
           "dynonn": ("tiny_dynonn.py", ["model.hidden=16", "model.head_dim=8",
                                         "model.ffn_hidden=8", "model.init_experts=3",
                                         "model.max_experts=4"])}
BUDGET = ["data.max_tasks=2", "data.max_len=256", "data.min_bucket=256", "data.batch_size=2",
          "train.num_steps=2", "train.ckpt_every=2", "train.eval_every=0",
          "train.plot_every=1000", "train.log_every=1"]
NEW = 8
REF_LEN = 32  # > longest prompt + NEW


def _cfg(family: str):
    name, over = CONFIGS[family]
    return apply_overrides(trainer.load_config(ROOT / "configs" / name), over + BUDGET)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """A directory of the 2 ARC-AGI-1 training tasks with the shortest prompts."""
    tasks = load_tasks("arc1", "train")
    small = sorted(tasks, key=lambda t: len(tokenizer.serialize_prompt(t, 0)))[:2]
    data = tmp_path_factory.mktemp("tasks")
    for t in small:
        pairs = {k: [{"input": i.tolist(), "output": o.tolist()} for i, o in ps]
                 for k, ps in (("train", t.train), ("test", t.test))}
        (data / f"{t.task_id}.json").write_text(json.dumps(pairs))
    return data, sorted(t.task_id for t in small)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_eval_cli_evaluates_every_family(family, tasks_dir, tmp_path, capsys, monkeypatch):
    # The restore and scoring plumbing of every family at a short budget; the budget floor
    # (what a 30x30 answer needs) is tested in test_eval_cli.py.
    monkeypatch.setattr(cli, "max_answer_tokens", lambda: NEW)
    cfg = _cfg(family)
    work = tmp_path / "work"
    trainer.run(cfg, work, quiet=True)
    # The CLI restores what training saved: evaluation parameters and the family's extras.
    params, extras, restored_cfg, step = cli.restore(work, None)
    state, _, _ = trainer.restore_train_state(work)
    assert step == 2 and restored_cfg == cfg
    chex.assert_trees_all_equal(params, state.params)
    # DynTRM and DynONN: the expert pool, live masks included (half of tiny.py's DynTRM pools
    # start live); SPL: the accuracy EMA.
    assert jax.tree.leaves(extras)
    chex.assert_trees_all_equal(*(jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        else x, e) for e in (extras, state.extras)))

    data, ids = tasks_dir
    out = tmp_path / "report.json"
    rc = cli.main(["--workdir", str(work), "--source", str(data), "--split", "train",
                   "--views", "2", "--max-new-tokens", str(NEW), "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["family"] == family and report["step"] == 2
    assert {r["task_id"] for r in report["reports"]} == set(ids)
    agg = report["aggregate"]
    assert agg["n_tasks"] == 2 and all(r["n_views"] == 2 for r in report["reports"])
    steps = agg["mean_refinement_steps"]
    if family == "dyntrm":  # per-row adaptive depth in [1, S]
        assert 1.0 <= steps <= cfg.model.max_refinement_steps
    else:  # no adaptive depth
        assert steps is None and agg["prompt_limit"] is None
    assert "mean refinement steps" in capsys.readouterr().out


def _reference(logits_fn, state, prompts, new):
    """Greedy decoding of each prompt alone, right-aligned at slot 0 of a fixed buffer (one
    compile) whose unwritten tail is padding (segment 0), one forward per token."""
    fwd = jax.jit(logits_fn)
    pos = jnp.arange(REF_LEN, dtype=jnp.int32)[None]
    toks, logps = [], []
    for p in prompts:
        seq, lp = list(p), []
        for _ in range(new):
            buf = np.full((1, REF_LEN), PAD, np.int32)
            buf[0, :len(seq)] = seq
            seg = (np.arange(REF_LEN) < len(seq)).astype(np.int32)[None]
            logits = fwd(state, jnp.asarray(buf), pos, jnp.asarray(seg))[0, len(seq) - 1]
            nxt = int(jnp.argmax(logits))
            lp.append(float(jax.nn.log_softmax(logits)[nxt]))
            seq.append(nxt)
            if nxt in (tokenizer.IM_END, tokenizer.EOS):
                break
        toks.append(seq[len(p):])
        logps.append(lp)
    return toks, logps


@pytest.mark.parametrize("family", ["spl", "dynonn"])
def test_recompute_generation_equals_decoding_each_prompt_alone(family):
    cfg = _cfg(family)
    fam = get_family(cfg)
    params, extras = fam.init(jax.random.key(0), cfg)
    logits_fn = FamilyLogits(fam, cfg)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.model.vocab_size, size=n).astype(np.int32) for n in (9, 5)]
    tokens, lengths = left_pad(prompts)
    gen = generate_by_recompute(logits_fn, (params, extras), jnp.asarray(tokens),
                                jnp.asarray(lengths), max_new_tokens=NEW)
    ref_toks, ref_lp = _reference(logits_fn, (params, extras), prompts, NEW)
    out = np.asarray(gen.tokens)
    for row, (rt, rl) in enumerate(zip(ref_toks, ref_lp, strict=True)):
        n = int(gen.num_generated[row])
        assert n == len(rt)
        np.testing.assert_array_equal(out[row, :n], rt)
        assert np.all(out[row, n:] == PAD)
        np.testing.assert_allclose(float(gen.mean_logprob[row]), np.mean(rl), atol=1e-5)
    assert gen.steps is None
