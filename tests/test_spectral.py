"""SLQ densities and tr f(A) against exact eigendecompositions, with derived bounds.

Bounds (module docstring of gne_jax.linalg.spectral): for spectrum range R, k Lanczos
steps, n_v probes and dimension n,
  W1(SLQ measure, eigenvalue measure) ≤ π R/(4k) + c · R/sqrt(2 n_v (n+2)),
the first term the Gauss-quadrature (Jackson) error, the second the probe noise
(E ≤ one unit; c = 4 as a "4 SE" margin); and after smoothing both with the same
Gaussian of standard deviation σ, L1 ≤ W1 · sqrt(2/π)/σ.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from gne_jax.linalg.spectral import (
    default_rel_sigma,
    jacobian_spectral_density,
    resolve_sigma,
    smooth_density,
    spectral_density,
    trace_function,
)


def _matrix_with_spectrum(lam, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    return (q * lam) @ q.T


def _w1_bound(span, k, num_probes, n, c=4.0):
    return math.pi * span / (4 * k) + c * span / math.sqrt(2 * num_probes * (n + 2))


def _exact_smoothed(lam, grid, sigma):
    z = (np.asarray(grid)[:, None] - lam[None]) / sigma
    return np.mean(np.exp(-0.5 * z**2), axis=1) / (sigma * math.sqrt(2 * math.pi))


def test_density_within_derived_distance_of_exact_spectrum():
    with jax.enable_x64(True):
        n, k, nv = 300, 25, 16
        rng = np.random.default_rng(0)
        # A two-bulk spectrum with an outlier: bulk near 1, bulk near 5, one at 12.
        lam = np.concatenate([rng.uniform(0.5, 1.5, 200), rng.uniform(4, 6, 99), [12.0]])
        a = jnp.asarray(_matrix_with_spectrum(lam, 1))
        d = jax.jit(lambda key: spectral_density(
            lambda v: a @ v, jnp.zeros(n), key=key, num_steps=k, num_probes=nv, num_grid=2000,
            sigma=0.2))(jax.random.key(0))
        span = lam.max() - lam.min()
        w1 = wasserstein_distance(np.ravel(d.nodes), lam, np.ravel(d.weights), None)
        bound = _w1_bound(span, k, nv, n)
        assert w1 < bound, (w1, bound)
        # Smoothed densities: L1 distance on the grid (which covers both ±4σ).
        exact = _exact_smoothed(lam, d.grid, 0.2)
        dx = float(d.grid[1] - d.grid[0])
        l1 = float(np.sum(np.abs(np.asarray(d.density) - exact)) * dx)
        assert l1 < bound * math.sqrt(2 / math.pi) / 0.2
        np.testing.assert_allclose(float(jnp.sum(d.density)) * dx, 1.0, atol=1e-3)
        # Informative: the measured distance is far inside the bound.
        assert w1 < 0.5 * bound


def test_resmoothing_is_a_pure_function_of_nodes_and_weights():
    with jax.enable_x64(True):
        lam = np.linspace(1.0, 3.0, 40)
        a = jnp.asarray(_matrix_with_spectrum(lam, 2))
        d = spectral_density(lambda v: a @ v, jnp.zeros(40), key=jax.random.key(1),
                             num_steps=10, num_probes=3, rel_sigma=0.05)
        nodes, weights = np.asarray(d.nodes), np.asarray(d.weights)
        np.testing.assert_allclose(float(d.sigma), 0.05 * (nodes.max() - nodes.min()))
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(smooth_density(d.nodes, d.weights, d.grid, d.sigma),
                                   d.density, rtol=1e-12)
        # Another σ, computed independently in NumPy.
        grid = np.linspace(0.0, 4.0, 101)
        z = (grid[:, None, None] - nodes[None]) / 0.1
        want = np.mean(np.sum(weights[None] * np.exp(-0.5 * z**2), -1), -1) / (
            0.1 * math.sqrt(2 * math.pi))
        np.testing.assert_allclose(smooth_density(d.nodes, d.weights, jnp.asarray(grid), 0.1),
                                   want, rtol=1e-10)
        # Default width: Papyan's κ = 3 rule.
        np.testing.assert_allclose(float(resolve_sigma(d.nodes)),
                                   default_rel_sigma(10) * (nodes.max() - nodes.min()))


def test_trace_functions_and_log_determinant():
    with jax.enable_x64(True):
        n = 120
        lam = np.random.default_rng(3).uniform(1.0, 10.0, n)
        a = jnp.asarray(_matrix_with_spectrum(lam, 4))
        d = jax.jit(lambda key: spectral_density(
            lambda v: a @ v, jnp.zeros(n), key=key, num_steps=20, num_probes=30,
            dist="normal"))(jax.random.key(2))
        # log is smooth on [1, 10]: the 20-node quadrature error (≤ ~1e-10) is far
        # below the probe noise, so the estimate is within 4 SE of the exact logdet.
        for f, exact in [(jnp.log, np.sum(np.log(lam))), (lambda x: x**2, np.sum(lam**2)),
                         (jnp.sqrt, np.sum(np.sqrt(lam)))]:
            est = trace_function(d.nodes, d.weights, f, n)
            assert abs(float(est.value) - exact) < 4 * float(est.sem), (est, exact)
            assert est.num_matvecs == 600
        # f = 1 integrates the weights: exactly n for every probe.
        ones = trace_function(d.nodes, d.weights, jnp.ones_like, n)
        np.testing.assert_allclose(ones.samples, n, rtol=1e-12)


def test_jacobian_log_density_and_logdet_of_jjt():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        w1 = jnp.asarray(rng.standard_normal((30, 24)) / math.sqrt(24))
        w2 = jnp.asarray(rng.standard_normal((24, 30)) * 2.0 / math.sqrt(30))

        def fn(x):
            return jnp.tanh(w2 @ jnp.tanh(w1 @ x))

        x = jnp.asarray(rng.standard_normal(24))
        jac = np.asarray(jax.jacfwd(fn)(x))  # (24, 24)
        lam = np.linalg.eigvalsh(jac @ jac.T)
        m, nv = 24, 40
        # k = m: the Krylov space is the whole space and each probe's quadrature is
        # exact for any f; only probe noise remains.
        d = jax.jit(lambda key: jacobian_spectral_density(
            fn, x, key=key, num_steps=m, num_probes=nv, sigma=0.25, dist="normal"))(
                jax.random.key(3))
        assert float(d.clipped_mass) == 0.0 and int(d.dim) == m
        logdet = trace_function(d.nodes, d.weights, jnp.log, m)
        assert abs(float(logdet.value) - np.sum(np.log(lam))) < 4 * float(logdet.sem)
        # Log-scale density against the exact one smoothed the same way (σ = 0.25 in
        # log λ); probe-noise part of the bound only, applied to log λ.
        span = np.log(lam).max() - np.log(lam).min()
        bound = 4.0 * span / math.sqrt(2 * nv * (m + 2)) * math.sqrt(2 / math.pi) / 0.25
        exact = _exact_smoothed(np.log(lam), d.grid, 0.25)
        l1 = float(np.sum(np.abs(np.asarray(d.density) - exact)) * float(d.grid[1] - d.grid[0]))
        assert l1 < bound, (l1, bound)


def test_vmap_over_keys_equals_loop_and_jit():
    n = 30
    a = jnp.asarray(_matrix_with_spectrum(np.linspace(0.1, 2, n), 6), jnp.float32)

    def run(key):
        return spectral_density(lambda v: a @ v, jnp.zeros(n), key=key, num_steps=8,
                                num_probes=2, sigma=0.1, num_grid=64)

    keys = jax.random.split(jax.random.key(7), 3)
    batched = jax.jit(jax.vmap(run))(keys)
    assert batched.nodes.shape == (3, 2, 8) and batched.nodes.dtype == jnp.float32
    for i in range(3):
        single = jax.jit(run)(keys[i])
        np.testing.assert_allclose(batched.nodes[i], single.nodes, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched.density[i], single.density, rtol=1e-4, atol=1e-6)


def test_bad_input_errors():
    a = jnp.eye(6) * 2.0
    mv = lambda v: a @ v
    key, like = jax.random.key(0), jnp.zeros(6)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(mv, like, key=key, num_steps=3, sigma=0.0)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(mv, like, key=key, num_steps=3, sigma=-1.0)
    with pytest.raises(ValueError, match="rel_sigma"):
        spectral_density(mv, like, key=key, num_steps=3, rel_sigma=0.0)
    with pytest.raises(ValueError, match="not both"):
        spectral_density(mv, like, key=key, num_steps=3, sigma=0.1, rel_sigma=0.1)
    with pytest.raises(ValueError, match="num_steps=7"):
        spectral_density(mv, like, key=key, num_steps=7)
    with pytest.raises(ValueError, match="not symmetric"):
        spectral_density(lambda v: jnp.triu(jnp.ones((6, 6))) @ v, like, key=key, num_steps=3)
    with pytest.raises(ValueError, match="sigma"):
        smooth_density(jnp.ones((1, 3)), jnp.ones((1, 3)) / 3, jnp.linspace(0, 2, 5), -0.5)
    with pytest.raises(ValueError, match=r"`grid` must be a 1-D array.*\(3, 3\)"):
        spectral_density(mv, like, key=key, num_steps=3, grid=jnp.zeros((3, 3)))
    with pytest.raises(TypeError, match="`like` must hold real floating-point arrays"):
        spectral_density(mv, jnp.zeros(6, jnp.int32), key=key, num_steps=3)
    with pytest.raises(ValueError, match=r"`matvec` must map .* shapes \[\(6,\)\] to \[\(5,\)\]"):
        spectral_density(lambda v: v[:5], like, key=key, num_steps=3)
    # Non-finite operator: clear error eagerly, flag (no NaN in the density) under jit.
    bad = lambda v: jnp.log(v[0] - 10.0) * (a @ v)  # log of a negative number: NaN
    with pytest.raises(ValueError, match="non-finite"):
        spectral_density(bad, like, key=key, num_steps=3, check_symmetry=False)
    out = jax.jit(lambda k: spectral_density(bad, like, key=k, num_steps=3, check_symmetry=False,
                                             sigma=0.1))(key)
    np.testing.assert_array_equal(out.num_finite_steps, 0)
    assert np.all(np.isfinite(np.asarray(out.density)))
