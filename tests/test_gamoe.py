"""GAMoE gate (issue 7, seed 004): dynamic K, fallback, routing-weight contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinyonn_jax.nn import gamoe
from tinyonn_jax.nn.routing import Route

D, E, N = 8, 6, 64


def _setup(seed=0, gates_offset=0.0):
    k1, k3 = jax.random.split(jax.random.key(seed))
    params = gamoe.init_gate(k1, D, E, init_t=0.1)
    params["gates"] = gates_offset + jnp.array([-0.2, 0.1, 0.3, 0.0, 0.2, -0.1])
    u = jax.random.normal(k3, (N, D))
    live = jnp.array([True, True, False, True, True, False])
    return params, u, live


def _direct_cos(params, u):
    u, p = np.asarray(u, np.float64), np.asarray(params["proto_sim"], np.float64)
    return (u / np.linalg.norm(u, axis=1, keepdims=True)) @ (p / np.linalg.norm(p, axis=0))


def test_orthogonal_prototypes_and_parameter_names():
    params, _, _ = _setup()
    p = np.asarray(params["proto_sim"])
    np.testing.assert_allclose(p.T @ p, np.eye(E), atol=1e-5)
    assert all(k.startswith(("proto", "gate")) for k in params)  # all routing ('meta') params
    np.testing.assert_allclose(float(gamoe.logit_scale(params)), 10.0, rtol=1e-6)


@pytest.mark.parametrize("weight_mode", gamoe.WEIGHT_MODES)
def test_dynamic_k_equals_direct_count(weight_mode):
    params, u, live = _setup()
    g = gamoe.gate(params, u, live, fallback=False, weight_mode=weight_mode)
    margin = _direct_cos(params, u) - np.asarray(params["gates"], np.float64)
    clear = np.all(np.abs(margin) > 1e-4, axis=1)  # skip float ties at the threshold
    direct = np.sum((margin > 0) & np.asarray(live), axis=1)
    assert clear.sum() > N // 2
    np.testing.assert_array_equal(np.asarray(g.k)[clear], direct[clear])
    assert len(set(direct.tolist())) > 1  # K really varies per token
    np.testing.assert_array_equal(np.asarray(g.homeless)[clear], direct[clear] == 0)


@pytest.mark.parametrize("weight_mode", gamoe.WEIGHT_MODES)
@pytest.mark.parametrize("fallback", [True, False])
def test_routing_contract(weight_mode, fallback):
    params, u, live = _setup(gates_offset=0.4)
    g = gamoe.gate(params, u, live, fallback=fallback, weight_mode=weight_mode)
    z, mask = np.asarray(g.z), np.asarray(g.mask)
    assert np.all(z >= 0)
    np.testing.assert_array_equal(z > 0, mask)  # z == 0 exactly where not routed
    np.testing.assert_array_equal(np.asarray(g.k), mask.sum(1))
    assert not mask[:, ~np.asarray(live)].any()  # dead slots never routed
    routed = mask.any(1)
    np.testing.assert_allclose(z[routed].sum(1), 1.0, rtol=1e-6)
    if weight_mode == "uniform":  # exactly 1/K, not merely close
        k = mask[routed].sum(1, keepdims=True).astype(np.float32)
        assert np.all(z[routed] == np.where(mask[routed], np.float32(1.0) / k, 0))
    assert isinstance(g.route, Route) and g.route.k is g.k


def test_fallback_only_where_k_is_zero():
    params, u, live = _setup(gates_offset=0.4)
    no = gamoe.gate(params, u, live, fallback=False, weight_mode="uniform")
    fb = gamoe.gate(params, u, live, fallback=True, weight_mode="uniform")
    homeless = np.asarray(no.homeless)
    assert 0 < homeless.sum() < N
    np.testing.assert_array_equal(np.asarray(fb.homeless), homeless)
    np.testing.assert_array_equal(np.asarray(fb.mask)[~homeless], np.asarray(no.mask)[~homeless])
    np.testing.assert_array_equal(np.asarray(fb.z)[~homeless], np.asarray(no.z)[~homeless])
    assert np.all(np.asarray(no.z)[homeless] == 0)  # dropped without fallback
    fb_mask = np.asarray(fb.mask)[homeless]
    assert np.all(fb_mask.sum(1) == 1)
    margin = np.where(np.asarray(live), np.asarray(fb.margin), -np.inf)[homeless]
    np.testing.assert_array_equal(fb_mask.argmax(1), margin.argmax(1))
    assert gamoe.fallback_on("eval", training=True) is False
    assert gamoe.fallback_on("eval", training=False) is True
    with pytest.raises(ValueError, match="fallback"):
        gamoe.fallback_on("sometimes", True)


def test_straight_through_gradient_reaches_only_active_experts():
    params, u, live = _setup()
    c = jax.random.normal(jax.random.key(3), (N, E))

    def f(gates):
        return jnp.sum(c * gamoe.gate({**params, "gates": gates}, u, live, fallback=False,
                                      weight_mode="uniform").z)

    g = gamoe.gate(params, u, live, fallback=False, weight_mode="uniform")
    grad = np.asarray(jax.grad(f)(params["gates"]))
    active = np.asarray(g.mask).any(0)
    assert np.all(grad[~active] == 0) and np.all(grad[active] != 0)


def test_replayed_decision_gives_the_same_gate():
    params, u, live = _setup()
    g = gamoe.gate(params, u, live, fallback=True, weight_mode="normalized")
    r = gamoe.gate(params, u, live, fallback=True, weight_mode="normalized",
                   decision=gamoe.Decision(g.mask, g.homeless))
    for a, b in zip(g, r, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_routing_record_counts_and_homeless_mean():
    params, u, live = _setup(gates_offset=0.4)
    g = gamoe.gate(params, u, live, fallback=True, weight_mode="uniform")
    valid = (jnp.arange(N) % 4 != 0).astype(jnp.float32)
    counts, hsum, hn = gamoe.routing_record(u, g, valid)
    m, h, v = np.asarray(g.mask), np.asarray(g.homeless), np.asarray(valid) > 0
    np.testing.assert_array_equal(np.asarray(counts), m[v].sum(0))
    un = np.asarray(u) / np.linalg.norm(np.asarray(u), axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(hsum), un[v & h].sum(0), rtol=1e-5, atol=1e-6)
    assert float(hn) == (v & h).sum()
