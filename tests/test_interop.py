"""Import / export of the original PyTorch DynTRM state dict (tinyonn_jax.interop.pytorch)."""

import dataclasses
import sys

import jax
import numpy as np
import pytest

import tinyonn_jax
from tinyonn_jax.config import Config
from tinyonn_jax.families.dyntrm import modules
from tinyonn_jax.families.dyntrm import transformer as tr
from tinyonn_jax.interop import export_state_dict, import_state_dict, save_safetensors
from tinyonn_jax.interop.pytorch import load_safetensors
from tinyonn_jax.nn import variables

D, H, P, V, S = 16, 2, 4, 18, 2
DH = D // H


def _reference_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays in the original's layout; gates spread so that routing is mixed."""
    rng = np.random.default_rng(seed)

    def normal(shape, std):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    sd = {"embedding.color_embedding.weight": normal((V, D), 1.0)}
    for i in range(P):
        sd[f"attn_expert_library.{i}.w1.weight"] = normal((DH, DH), DH**-0.5)
        sd[f"attn_expert_library.{i}.w2.weight"] = normal((DH, DH), DH**-0.5)
    sd["block.ln1.weight"] = (1.0 + normal((D,), 0.2)).astype(np.float32)
    sd["block.ln1.bias"] = normal((D,), 0.1)
    for c in "qkv":
        sd[f"block.attn.proto_{c}"] = normal((P, DH), 1.0)
        sd[f"block.attn.gate_{c}"] = normal((P,), 0.5)
    sd["block.attn.o_proj.weight"] = normal((D, D), D**-0.5)
    sd["lm_head.weight"] = normal((V, D), D**-0.5)
    return sd


def _reference_forward(sd: dict[str, np.ndarray], tokens: np.ndarray, steps: int):
    """The original ArcTransformer forward, in float64 numpy, written from its definition.

    Returns (logits (B,T,V), fraction of active (token, head, expert) routing entries).
    """
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    silu = lambda a: a / (1.0 + np.exp(-a))  # noqa: E731
    x = sd["embedding.color_embedding.weight"][tokens]
    b, t, d = x.shape
    causal = np.tril(np.ones((t, t), bool))
    active = []
    for _ in range(steps):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        u = (x - mu) / np.sqrt(var + 1e-5) * sd["block.ln1.weight"] + sd["block.ln1.bias"]
        u = u.reshape(b, t, H, DH)
        qkv = {}
        for c in "qkv":
            z = np.maximum(u @ sd[f"block.attn.proto_{c}"].T / np.sqrt(DH)
                           - sd[f"block.attn.gate_{c}"], 0.0)  # (B,T,H,P)
            active.append(z > 0)
            out = np.zeros_like(u)
            for p in range(P):  # torch Linear: y = x @ W.T
                w1 = sd[f"attn_expert_library.{p}.w1.weight"]
                w2 = sd[f"attn_expert_library.{p}.w2.weight"]
                out += z[..., p : p + 1] * (silu(u @ w1.T) @ w2.T)
            qkv[c] = out.transpose(0, 2, 1, 3)  # (B,H,T,Dh) as SDPA wants
        att = qkv["q"] @ qkv["k"].transpose(0, 1, 3, 2) / np.sqrt(DH)
        att = np.where(causal, att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att = att / att.sum(-1, keepdims=True)
        o = (att @ qkv["v"]).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = x + o @ sd["block.attn.o_proj.weight"].T
    return x @ sd["lm_head.weight"].T, float(np.mean(np.concatenate(active)))


def test_import_matches_reference_forward():
    sd = _reference_state_dict()
    tokens = np.random.default_rng(1).integers(0, V, (2, 7))
    cfg, params = import_state_dict(sd, num_heads=H, steps=S)
    ref, frac_active = _reference_forward(sd, tokens, S)
    assert 0.1 < frac_active < 0.9  # both active and inactive experts are exercised
    logits, _ = tr.forward(params, tokens, cfg.model)
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5)
    # The package-level entry points take what the import returns.
    top, _ = tinyonn_jax.forward(params, tokens, cfg.model)
    np.testing.assert_array_equal(np.asarray(top), np.asarray(logits))
    fresh = tinyonn_jax.init_params(jax.random.key(0), cfg.model)
    assert jax.tree.structure(fresh) == jax.tree.structure(params)
    module_params = variables.pure_params(tinyonn_jax.DynTRM(cfg.model, jax.random.key(0)))
    jax.tree.map(np.testing.assert_array_equal, module_params, fresh)


def test_imported_config_and_params_fit_the_model():
    cfg, params = import_state_dict(_reference_state_dict(), num_heads=H, steps=S)
    m = cfg.model
    assert isinstance(cfg, Config)
    assert (m.hidden, m.num_heads, m.num_attn_experts, m.vocab_size) == (D, H, P, V)
    assert (m.max_refinement_steps, m.head_dim, m.attn_mlp_hidden) == (S, DH, DH)
    assert (m.rope, m.use_ffn, m.final_norm, m.attn_routing, m.ln_eps) == (
        "none", False, False, "capr", 1e-5)
    assert m.attn_layout == "qkv_routers"  # pinned: the default is the seed's latent heads
    want = jax.eval_shape(lambda k: modules.init_params(k, m), jax.random.key(0))
    assert jax.tree.structure(want) == jax.tree.structure(params)
    for w, p in zip(jax.tree.leaves(want), jax.tree.leaves(params), strict=True):
        assert (w.shape, w.dtype) == (p.shape, p.dtype)
    # torch Linear (out, in) -> ours (in, out)
    sd = _reference_state_dict()
    np.testing.assert_array_equal(params["block"]["attn"]["library"]["w1"][2],
                                  sd["attn_expert_library.2.w1.weight"].T)


def test_halting_head_never_exits_early():
    cfg, params = import_state_dict(_reference_state_dict(), num_heads=H, steps=S)
    tokens = np.random.default_rng(2).integers(0, V, (3, 5))
    logits, steps = tr.forward_adaptive(params, tokens, cfg.model)
    np.testing.assert_array_equal(np.asarray(steps), S)
    # The head alone (p_halt = sigmoid(-5) for every input) never reaches the usual threshold.
    _, steps = tr.forward_adaptive(params, tokens, cfg.model, threshold=0.5)
    np.testing.assert_array_equal(np.asarray(steps), S)
    full, _ = tr.forward(params, tokens, cfg.model)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full), rtol=1e-6, atol=1e-6)


def test_import_export_round_trip_is_bitwise():
    sd = _reference_state_dict()
    cfg, params = import_state_dict(sd, num_heads=H, steps=S)
    out = export_state_dict(params, cfg)
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert out[k].dtype == np.float32 and out[k].flags.c_contiguous, k
        np.testing.assert_array_equal(out[k].view(np.uint32), v.view(np.uint32), err_msg=k)
    # ... and back again: params are reproduced exactly too.
    _, params2 = import_state_dict(out, num_heads=H, steps=S)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_keys_give_one_error_listing_all():
    sd = _reference_state_dict()
    del sd["block.attn.gate_k"]
    del sd["attn_expert_library.3.w2.weight"]
    sd["block.attn.q_norm.weight"] = np.ones((DH,), np.float32)
    sd["block.attn.proto_v"] = np.zeros((P, DH + 1), np.float32)
    sd["lm_head.weight"] = np.zeros((V, D, 1), np.float32)
    with pytest.raises(ValueError) as e:
        import_state_dict(sd, num_heads=H, steps=S)
    msg = str(e.value)
    for needle in ("missing keys (2)", "block.attn.gate_k", "attn_expert_library.3.w2.weight",
                   "unexpected keys (1)", "block.attn.q_norm.weight", "misshapen (2)",
                   "block.attn.proto_v: (4, 9), expected (4, 8)", "lm_head.weight: (18, 16, 1)"):
        assert needle in msg, (needle, msg)


def test_wrapper_prefix_and_bad_heads_are_explained():
    sd = {f"module.{k}": v for k, v in _reference_state_dict().items()}
    with pytest.raises(ValueError, match="prefix 'module.'"):
        import_state_dict(sd, num_heads=H, steps=S)
    with pytest.raises(ValueError, match="num_heads=3 does not divide"):
        import_state_dict(_reference_state_dict(), num_heads=3, steps=S)
    sd = _reference_state_dict()
    sd["block.ln1.bias"] = np.arange(D)  # integers are not weights
    with pytest.raises(ValueError, match="block.ln1.bias: dtype int64"):
        import_state_dict(sd, num_heads=H, steps=S)


def test_export_refuses_what_the_original_cannot_represent():
    cfg, params = import_state_dict(_reference_state_dict(), num_heads=H, steps=S)
    bad = dataclasses.replace(cfg.model, use_ffn=True, rope="rope1d", final_norm=True)
    with pytest.raises(ValueError) as e:
        export_state_dict(params, bad)
    for needle in ("use_ffn=True", "rope='rope1d'", "final_norm=True"):
        assert needle in str(e.value)
    with pytest.raises(ValueError, match="attn_layout='latent_heads'"):
        export_state_dict(params, dataclasses.replace(cfg.model, attn_layout="latent_heads"))
    extra = dict(params, final_ln={"scale": np.ones(D), "bias": np.zeros(D)})
    with pytest.raises(ValueError, match="unexpected \\['final_ln'\\]"):
        export_state_dict(extra, cfg)


def test_dict_input_works_without_safetensors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    cfg, params = import_state_dict(_reference_state_dict(), num_heads=H, steps=S)
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\0" * 8)
    with pytest.raises(ImportError, match="pip install safetensors"):
        import_state_dict(path, num_heads=H, steps=S)
    with pytest.raises(ValueError, match="only .safetensors"):
        import_state_dict(tmp_path / "m.pt", num_heads=H, steps=S)


def test_safetensors_file_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    sd = _reference_state_dict()
    path = save_safetensors(sd, tmp_path / "dyntrm.safetensors", metadata={"steps": str(S)})
    loaded = load_safetensors(path)
    assert set(loaded) == set(sd)
    cfg, params = import_state_dict(str(path), num_heads=H, steps=S)
    out = export_state_dict(params, cfg)
    for k, v in sd.items():
        np.testing.assert_array_equal(out[k].view(np.uint32), v.view(np.uint32), err_msg=k)
