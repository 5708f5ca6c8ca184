"""Hessian / Gauss–Newton curvature against materialized Hessians and exact identities."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gne_jax.curvature import (
    gauss_newton_matvec,
    group_traces,
    hessian_density,
    hessian_eigenpairs,
    hessian_group_traces,
    hessian_matvec,
    hessian_trace,
    parameter_groups,
    trace,
)

SIZES = (5, 8, 8, 3)  # input, two hidden layers, output


def init_mlp(key, sizes=SIZES, dtype=jnp.float32):
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, din, dout) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True)):
        kw, kb = jax.random.split(k)
        params[f"layer{i}"] = {
            "kernel": jax.random.normal(kw, (din, dout), dtype) * math.sqrt(2.0 / din),
            "bias": 0.1 * jax.random.normal(kb, (dout,), dtype),
        }
    return params


def mlp(params, x, act=jax.nn.relu):
    n = len(params)
    for i in range(n):
        x = x @ params[f"layer{i}"]["kernel"] + params[f"layer{i}"]["bias"]
        if i < n - 1:
            x = act(x)
    return x


def data(dtype=jnp.float32):
    kx, ky = jax.random.split(jax.random.key(42))
    return jax.random.normal(kx, (4, SIZES[0]), dtype), jax.random.normal(ky, (4, SIZES[-1]), dtype)


def squared_loss(params, x, y, act=jax.nn.relu):
    return 0.5 * jnp.sum((mlp(params, x, act) - y) ** 2)


def dense_hessian(loss_fn, params):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: loss_fn(unravel(f)))(flat)


def test_relu_hessian_trace_equals_squared_jacobian_norms():
    # derivations §14.3: piecewise-linear net, ℓ = ½‖f − y‖²  ⇒  tr H = Σ_l ‖∂f/∂θ_l‖²_F.
    with jax.enable_x64(True):
        params = init_mlp(jax.random.key(0), dtype=jnp.float64)
        x, y = data(jnp.float64)
        loss_fn = lambda p: squared_loss(p, x, y)
        jac = jax.jacrev(lambda p: mlp(p, x))(params)  # leaves: (4, 3, *param_shape)
        per_layer = {name: sum(float(jnp.sum(j**2)) for j in jax.tree.leaves(sub))
                     for name, sub in jac.items()}
        identity = sum(per_layer.values())
        exact = float(jnp.trace(dense_hessian(loss_fn, params)))
        np.testing.assert_allclose(exact, identity, rtol=1e-10)  # the identity itself
        est = jax.jit(lambda k: hessian_trace(loss_fn, params, key=k, num_probes=400))(
            jax.random.key(1))
        assert abs(float(est.value) - identity) < 4 * float(est.sem), (est.value, identity)
        assert float(est.sem) < 0.1 * identity  # the check has teeth
        # Hutch++ on the same operator.
        pp = jax.jit(lambda k: hessian_trace(loss_fn, params, key=k, num_probes=120,
                                             method="hutch++"))(jax.random.key(2))
        assert abs(float(pp.value) - identity) < 4 * float(pp.sem) + 1e-8 * identity
        # Per-layer: tr H_ll is the layer's ‖∂f/∂θ_l‖²_F (diagonal blocks only).
        groups = jax.jit(lambda k: hessian_group_traces(loss_fn, params, key=k, num_probes=400))(
            jax.random.key(3))
        for name, value in per_layer.items():
            assert abs(float(groups.value[name]) - value) < 4 * float(groups.sem[name]) + 1e-9


def test_group_traces_match_exact_diagonal_blocks():
    with jax.enable_x64(True):
        params = init_mlp(jax.random.key(4), dtype=jnp.float64)
        x, y = data(jnp.float64)
        loss_fn = lambda p: squared_loss(p, x, y, act=jnp.tanh)
        h = np.asarray(dense_hessian(loss_fn, params))
        names = parameter_groups(params, "leaf")
        sizes = [int(np.size(leaf)) for leaf in jax.tree.leaves(params)]
        offsets = np.cumsum([0] + sizes)
        exact = {n: np.trace(h[a:b, a:b]) for n, a, b in
                 zip(names, offsets[:-1], offsets[1:], strict=True)}
        est = jax.jit(lambda k: hessian_group_traces(loss_fn, params, key=k, num_probes=300,
                                                     groups="leaf"))(jax.random.key(5))
        assert set(est.value) == set(exact)
        for n in exact:
            assert abs(float(est.value[n]) - exact[n]) < 4 * float(est.sem[n]) + 1e-9, n
            assert est.sizes[n] == sizes[names.index(n)]
        np.testing.assert_allclose(float(est.total.value),
                                   sum(float(v) for v in est.value.values()), rtol=1e-10)
        assert parameter_groups(params, "layer")[:2] == ["layer0", "layer0"]
        assert set(parameter_groups(params, lambda p: p.split("/")[-1])) == {"kernel", "bias"}


def test_top_eigenvalues_match_eigvalsh_of_materialized_hessian():
    with jax.enable_x64(True):
        params = init_mlp(jax.random.key(6), dtype=jnp.float64)
        x, y = data(jnp.float64)
        loss_fn = lambda p: squared_loss(p, x, y, act=jnp.tanh)
        exact = np.linalg.eigvalsh(np.asarray(dense_hessian(loss_fn, params)))
        n = exact.size
        r = jax.jit(lambda k: hessian_eigenpairs(loss_fn, params, key=k, num_eigs=5, num_steps=80))(
            jax.random.key(7))
        np.testing.assert_allclose(np.asarray(r.values), exact[::-1][:5], rtol=1e-4)
        # Eigenvectors come back as parameter pytrees; check H x = θ x via the HVP.
        hvp = hessian_matvec(loss_fn, params)
        x0 = jax.tree.map(lambda v: v[0], r.vectors)
        hx = ravel_pytree(hvp(x0))[0]
        np.testing.assert_allclose(hx, float(r.values[0]) * ravel_pytree(x0)[0],
                                   atol=1e-6 * abs(float(r.values[0])))
        bottom = jax.jit(lambda k: hessian_eigenpairs(loss_fn, params, key=k, num_eigs=2,
                                                      num_steps=n, which="smallest"))(
            jax.random.key(8))
        np.testing.assert_allclose(np.asarray(bottom.values), exact[:2], rtol=1e-6, atol=1e-9)


def test_gauss_newton_matches_materialized_and_equals_hessian_trace_for_relu():
    with jax.enable_x64(True):
        params = init_mlp(jax.random.key(9), dtype=jnp.float64)
        x, y = data(jnp.float64)
        apply_fn = lambda p: mlp(p, x)
        loss_out = lambda f: 0.5 * jnp.sum((f - y) ** 2)
        gn = gauss_newton_matvec(apply_fn, params, loss_out)
        flat, unravel = ravel_pytree(params)
        g_dense = jax.vmap(lambda e: ravel_pytree(gn(unravel(e)))[0])(jnp.eye(flat.size))
        jac = jax.jacrev(lambda f: apply_fn(unravel(f)).ravel())(flat)  # (12, n)
        np.testing.assert_allclose(g_dense, jac.T @ jac, atol=1e-10)  # H_out = I
        h = dense_hessian(lambda p: loss_out(apply_fn(p)), params)
        # ReLU: G ≠ H (cross-layer second derivatives) but tr G = tr H.
        assert float(jnp.max(jnp.abs(h - g_dense))) > 1e-3
        np.testing.assert_allclose(jnp.trace(g_dense), jnp.trace(h), rtol=1e-10)
        # Cross-entropy output Hessian diag(p) − ppᵀ, against an explicit J^T H_out J.
        ce = lambda f: -jnp.sum(jax.nn.log_softmax(f) * jax.nn.softmax(y))
        gce = gauss_newton_matvec(apply_fn, params, ce)
        out = apply_fn(params)
        p = jax.nn.softmax(out)
        hout = jax.scipy.linalg.block_diag(*[jnp.diag(pi) - jnp.outer(pi, pi) for pi in p])
        v = unravel(jax.random.normal(jax.random.key(0), flat.shape, jnp.float64))
        np.testing.assert_allclose(ravel_pytree(gce(v))[0],
                                   jac.T @ (hout @ (jac @ ravel_pytree(v)[0])), atol=1e-10)


def test_vmap_over_four_inits_equals_loop():
    x, y = data()
    loss = lambda p: squared_loss(p, x, y, act=jnp.tanh)
    params = jax.vmap(init_mlp)(jax.random.split(jax.random.key(10), 4))
    keys = jax.random.split(jax.random.key(11), 4)

    def measure(p, k):
        k1, k2, k3 = jax.random.split(k, 3)
        t = hessian_trace(loss, p, key=k1, num_probes=8)
        e = hessian_eigenpairs(loss, p, key=k2, num_eigs=2, num_steps=12)
        g = hessian_group_traces(loss, p, key=k3, num_probes=4)
        return t.value, e.values, g.value["layer1"]

    batched = jax.jit(jax.vmap(measure))(params, keys)
    single = jax.jit(measure)
    for i in range(4):
        one = single(jax.tree.map(lambda a, i=i: a[i], params), keys[i])
        for b, s in zip(batched, one, strict=True):
            np.testing.assert_allclose(b[i], s, rtol=2e-4, atol=1e-5)


def test_density_of_small_hessian_and_hvp_modes_agree():
    with jax.enable_x64(True):
        params = init_mlp(jax.random.key(12), dtype=jnp.float64)
        x, y = data(jnp.float64)
        loss_fn = lambda p: squared_loss(p, x, y, act=jnp.tanh)
        v = jax.tree.map(jnp.ones_like, params)
        np.testing.assert_allclose(
            ravel_pytree(hessian_matvec(loss_fn, params)(v))[0],
            ravel_pytree(hessian_matvec(loss_fn, params, linearize=False)(v))[0], rtol=1e-12)
        exact = np.linalg.eigvalsh(np.asarray(dense_hessian(loss_fn, params)))
        n = exact.size
        d = jax.jit(lambda k: hessian_density(loss_fn, params, key=k, num_steps=n, num_probes=4,
                                              sigma=0.05))(jax.random.key(13))
        # Full Krylov space: every probe's nodes are the exact eigenvalues.
        np.testing.assert_allclose(np.sort(np.asarray(d.nodes[0])), exact, atol=1e-8)


def test_bad_input_errors():
    params = init_mlp(jax.random.key(0))
    x, y = data()
    with pytest.raises(ValueError, match="scalar"):
        hessian_trace(lambda p: mlp(p, x), params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"`loss_fn` rejected the input `params`"):
        hessian_trace(lambda p: p["nope"], params, key=jax.random.key(0))
    with pytest.raises(ValueError, match="method"):
        hessian_trace(lambda p: squared_loss(p, x, y), params, key=jax.random.key(0),
                      method="xtrace")
    with pytest.raises(ValueError, match="groups"):
        parameter_groups(params, "module")
    with pytest.raises(ValueError, match="num_probes"):
        group_traces(lambda v: v, params, key=jax.random.key(0), num_probes=1)
    with pytest.raises(ValueError, match="num_steps=500"):
        hessian_eigenpairs(lambda p: squared_loss(p, x, y), params, key=jax.random.key(0),
                           num_steps=500)


def test_non_finite_trace_estimates_raise_eagerly():
    """A NaN weight makes every HVP NaN: the eager trace functions say so (as the Lanczos
    ones do) instead of returning NaN; under jit the NaN is returned as it is."""
    params = init_mlp(jax.random.key(0))
    x, y = data()
    bad = jax.tree.map(lambda a: a, params)
    bad["layer0"]["kernel"] = bad["layer0"]["kernel"].at[0, 0].set(jnp.nan)
    key = jax.random.key(0)

    def loss(p):
        return squared_loss(p, x, y)

    with pytest.raises(ValueError, match="Hessian-vector product produced a non-finite"):
        hessian_trace(loss, bad, key=key, num_probes=4)
    with pytest.raises(ValueError, match="Hessian-vector product produced a non-finite"):
        hessian_group_traces(loss, bad, key=key, num_probes=4)
    with pytest.raises(ValueError, match="matvec produced a non-finite"):
        trace(lambda v: jax.tree.map(lambda a: jnp.nan * a, v), params, key=key, num_probes=4)
    with pytest.raises(ValueError, match="matvec produced a non-finite"):
        group_traces(lambda v: jax.tree.map(lambda a: jnp.nan * a, v), params, key=key,
                     num_probes=4)
    assert np.isnan(float(jax.jit(lambda p: hessian_trace(loss, p, key=key,
                                                           num_probes=4).value)(bad)))
    # the finite case is unchanged
    assert np.isfinite(float(hessian_trace(loss, params, key=key, num_probes=4).value))
