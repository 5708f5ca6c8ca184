"""jacobian_moments against exact spectra (closed forms, jacfwd + eigvalsh)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import ortho_group

import gne_jax
from gne_jax import jacobian_moments


def exact_moments(fn, x):
    """φ, φ₂, ϕ from the eigenvalues of JJᵀ (m×m, m the output size)."""
    J = jax.jacfwd(lambda z: jnp.ravel(fn(z)))(x).reshape(-1, np.size(x))
    ev = np.linalg.eigvalsh(np.asarray(J @ J.T, np.float64))
    return ev.mean(), (ev**2).mean(), ev.var()


def assert_within(est, sem, exact, n_sem=4.0, rtol=1e-5, what=""):
    tol = n_sem * float(sem) + rtol * abs(exact)
    assert abs(float(est) - exact) <= tol, f"{what}: {float(est)} vs exact {exact} (tol {tol})"


def linear(A):
    A = jnp.asarray(A, jnp.float32)
    return lambda x: A @ x


def mlp(key, widths, act, gain, orthogonal=False):
    keys = jax.random.split(key, len(widths) - 1)
    Ws = []
    for k, (n, m) in zip(keys, zip(widths[:-1], widths[1:], strict=True), strict=True):
        if orthogonal:
            W = jax.nn.initializers.orthogonal(gain)(k, (m, n))
        else:
            W = gain * jax.random.normal(k, (m, n)) / np.sqrt(n)
        Ws.append(W)

    def fn(x):
        for W in Ws:
            x = act(W @ x)
        return x

    return fn


KEY = jax.random.key(0)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
def test_diagonal_map_known_spectrum(method, dist):
    d = jnp.linspace(0.1, 2.0, 64)  # J = diag(d): JJᵀ eigenvalues d²
    ev = np.asarray(d, np.float64) ** 2
    m = jacobian_moments(lambda x: d * x, jnp.ones(64), key=KEY, num_probes=60, method=method,
                         dist=dist)
    if dist == "rademacher" and method == "hutchinson":
        # vᵀDv = Σ dᵢ² exactly for ±1 probes: zero variance on a diagonal matrix
        np.testing.assert_allclose(m.phi, ev.mean(), rtol=1e-5)
        np.testing.assert_allclose(m.phi_sem, 0.0, atol=1e-6)
    assert_within(m.phi, m.phi_sem, ev.mean(), what="phi")
    assert_within(m.phi2, m.phi2_sem, (ev**2).mean(), what="phi2")
    assert_within(m.varphi, m.varphi_sem, ev.var(), what="varphi")


def test_scaled_orthogonal_is_isometric():
    Q = ortho_group.rvs(96, random_state=0) * 1.5
    m = jacobian_moments(linear(Q), jnp.ones(96), key=KEY, num_probes=64)
    # JJᵀ = 2.25 I: every probe returns exactly φ = 2.25, φ₂ = 2.25², ϕ = 0
    np.testing.assert_allclose(m.phi, 2.25, rtol=1e-5)
    np.testing.assert_allclose(m.phi2, 2.25**2, rtol=1e-5)
    np.testing.assert_allclose(m.varphi, 0.0, atol=1e-4)
    np.testing.assert_allclose(m.phi_sem, 0.0, atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 120), (120, 40)])
def test_gaussian_rectangular(shape):
    m_out, n_in = shape
    A = np.random.default_rng(1).normal(size=shape) / np.sqrt(n_in)
    ev = np.linalg.eigvalsh(A @ A.T)  # m eigenvalues (m − n zeros when expanding)
    r = jacobian_moments(linear(A), jnp.ones(n_in), key=KEY, num_probes=200)
    assert_within(r.phi, r.phi_sem, ev.mean(), what="phi")
    assert_within(r.phi2, r.phi2_sem, (ev**2).mean(), what="phi2")
    assert_within(r.varphi, r.varphi_sem, ev.var(), what="varphi")
    assert r.out_size == m_out and r.in_size == n_in
    # input-side normalization divides the same traces by n: φ(JᵀJ) = (m/n) φ(JJᵀ)
    ri = jacobian_moments(linear(A), jnp.ones(n_in), key=KEY, num_probes=200,
                          normalize="input")
    np.testing.assert_allclose(ri.phi, r.phi * m_out / n_in, rtol=1e-5)
    np.testing.assert_allclose(ri.phi2, r.phi2 * m_out / n_in, rtol=1e-5)


@pytest.mark.parametrize(
    "act,gain,orth", [(jnp.tanh, 1.0, True), (jnp.tanh, 1.0, False), (jax.nn.relu, 2**0.5, False)]
)
def test_deep_mlp_against_eigvalsh(act, gain, orth):
    fn = mlp(jax.random.key(3), [64] * 9, act, gain, orthogonal=orth)  # depth 8
    x = jax.random.normal(jax.random.key(4), (64,))
    phi, phi2, varphi = exact_moments(fn, x)
    for method in ("hutchinson", "hutch++"):
        r = jacobian_moments(fn, x, key=KEY, num_probes=96, method=method)
        assert_within(r.phi, r.phi_sem, phi, what=f"{method} phi")
        assert_within(r.phi2, r.phi2_sem, phi2, what=f"{method} phi2")
        assert_within(r.varphi, r.varphi_sem, varphi, what=f"{method} varphi")
    e = jacobian_moments(fn, x, method="exact")
    np.testing.assert_allclose([e.phi, e.phi2, e.varphi], [phi, phi2, varphi], rtol=2e-4,
                               atol=1e-7)


def test_standard_error_is_calibrated_and_shrinks_as_one_over_sqrt_k():
    fn = mlp(jax.random.key(5), [48, 48, 48], jnp.tanh, 1.3)
    x = jax.random.normal(jax.random.key(6), (48,))
    phi, _, _ = exact_moments(fn, x)
    keys = jax.random.split(jax.random.key(7), 200)
    run = jax.jit(jax.vmap(lambda k, K=None: jacobian_moments(fn, x, key=k, num_probes=16)))
    small = run(keys)
    big = jax.vmap(lambda k: jacobian_moments(fn, x, key=k, num_probes=256))(keys[:40])
    # the reported SE matches the spread of the estimate across keys (200 replicates:
    # the sample std of 200 values is within ±20% of the truth with overwhelming odds)
    spread = float(np.std(small.phi, ddof=1))
    np.testing.assert_allclose(float(np.mean(small.phi_sem)), spread, rtol=0.25)
    # …and is unbiased for phi
    assert abs(float(np.mean(small.phi)) - phi) < 4 * spread / np.sqrt(200)
    # 16× the probes: SE shrinks by √16 = 4
    ratio = float(np.mean(small.phi_sem) / np.mean(big.phi_sem))
    assert 3.3 < ratio < 4.8, ratio


def test_spread_standard_error_is_calibrated():
    """spread = ϕ/φ²: its SE (delta method with the covariance of the per-probe samples,
    which is strongly positive) matches the spread of the estimate across 300 keys, on a
    square map and a non-square pytree-to-pytree one. The sample std of 300 values is
    within ±12% of the truth at 3 sigma; the delta method's own error at 32 probes is a
    few percent. Without the covariance the SE was 1.6-2.8× too large."""
    rng = np.random.default_rng(1)
    ws = [jnp.asarray(rng.standard_normal((20, 20)) / np.sqrt(20) * 1.2, jnp.float32)
          for _ in range(3)]
    wa, wb = (jnp.asarray(rng.standard_normal(s) / 4, jnp.float32) for s in ((12, 16), (6, 16)))

    def square(z):
        for w in ws:
            z = jnp.tanh(w @ z)
        return z

    def tree_fn(z):
        h = jnp.tanh(jnp.concatenate([z["a"], z["b"]]))
        return {"u": jnp.tanh(wa @ h), "v": jnp.sin(wb @ h)}

    cases = [(square, jnp.asarray(rng.standard_normal(20), jnp.float32)),
             (tree_fn, {"a": jnp.ones(10), "b": jnp.linspace(-1.0, 1.0, 6)})]
    keys = jax.random.split(jax.random.key(9), 300)
    for fn, x in cases:
        exact = jacobian_moments(fn, x, method="exact")
        r = jax.jit(jax.vmap(lambda k, fn=fn, x=x: jacobian_moments(fn, x, key=k,
                                                                    num_probes=32)))(keys)
        s, se = np.asarray(r.spread), np.asarray(r.spread_sem)
        empirical = float(np.std(s, ddof=1))
        assert 0.85 < float(np.sqrt(np.mean(se**2))) / empirical < 1.2, (
            float(np.sqrt(np.mean(se**2))), empirical)
        assert abs(float(np.mean(s)) - float(exact.spread)) < 4 * empirical / np.sqrt(300)
    assert float(exact.spread_sem) < 1e-5  # exact: the rounding floor only


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    n = 200
    Q = ortho_group.rvs(n, random_state=2)
    s = 1.0 / np.arange(1, n + 1)  # singular values decaying as 1/i
    A = (Q * s) @ ortho_group.rvs(n, random_state=3)
    fn = linear(A)
    phi = float(np.sum(s**2) / n)
    keys = jax.random.split(jax.random.key(8), 40)
    x = jnp.ones(n)

    def errors(method):
        r = jax.vmap(lambda k: jacobian_moments(fn, x, key=k, num_probes=30, method=method))(keys)
        return float(np.sqrt(np.mean((np.asarray(r.phi) - phi) ** 2)))

    e_h, e_pp = errors("hutchinson"), errors("hutch++")
    assert e_pp < 0.5 * e_h, (e_pp, e_h)


def test_jit_vmap_over_keys_and_params_equal_loop():
    x = jax.random.normal(jax.random.key(9), (32,))
    keys = jax.random.split(jax.random.key(10), 8)
    Ws = jax.random.normal(jax.random.key(11), (8, 32, 32)) / np.sqrt(32)

    def moments(W, k):
        return jacobian_moments(lambda z: jnp.tanh(W @ z), x, key=k, num_probes=8)

    fn0 = lambda z: jnp.tanh(Ws[0] @ z)  # one function object: one compilation for the loop
    looped = [jacobian_moments(fn0, x, key=k, num_probes=8) for k in keys]
    vm = jax.vmap(lambda k: moments(Ws[0], k))(keys)
    jt = jax.jit(jax.vmap(lambda k: moments(Ws[0], k)))(keys)
    for i in range(8):
        np.testing.assert_allclose(vm.phi[i], looped[i].phi, rtol=1e-5)
        np.testing.assert_allclose(jt.phi2[i], looped[i].phi2, rtol=1e-5)
    looped_p = [moments(W, keys[0]) for W in Ws]
    vp = jax.jit(jax.vmap(lambda W: moments(W, keys[0])))(Ws)
    np.testing.assert_allclose(vp.phi, [r.phi for r in looped_p], rtol=1e-5)
    np.testing.assert_allclose(vp.varphi, [r.varphi for r in looped_p], rtol=1e-4, atol=1e-6)
    chex.assert_shape(vp.phi_samples, (8, 8))


def test_same_key_same_result_and_chunking_does_not_change_it():
    fn = mlp(jax.random.key(12), [32, 32, 32], jnp.tanh, 1.0)
    x = jnp.ones(32)
    a = jacobian_moments(fn, x, key=KEY, num_probes=12)
    b = jacobian_moments(fn, x, key=KEY, num_probes=12)
    c = jacobian_moments(fn, x, key=KEY, num_probes=12, probe_chunk=5)
    np.testing.assert_array_equal(a.phi_samples, b.phi_samples)
    np.testing.assert_allclose(c.phi_samples, a.phi_samples, rtol=1e-6)
    np.testing.assert_allclose(c.phi2_samples, a.phi2_samples, rtol=1e-6)


def test_grad_matches_finite_difference():
    W = jax.random.normal(jax.random.key(13), (24, 24)) / np.sqrt(24)
    x = jax.random.normal(jax.random.key(14), (24,))
    with jax.enable_x64(True):
        W64, x64 = jnp.asarray(W, jnp.float64), jnp.asarray(x, jnp.float64)

        def phi(s):
            return jacobian_moments(lambda z: jnp.tanh(s * W64 @ z), x64, key=KEY,
                                    num_probes=8).phi

        g = jax.grad(phi)(1.3)
        h = 1e-6
        fd = (phi(1.3 + h) - phi(1.3 - h)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_pytree_input_and_output_sizes_are_total_elements():
    A = jax.random.normal(jax.random.key(15), (10, 6))
    B = jax.random.normal(jax.random.key(16), (10, 4))

    def fn(inp):  # dict in, tuple out
        y = A @ inp["a"] + B @ inp["b"]
        return (y, 2.0 * inp["b"])

    x = {"a": jnp.ones(6), "b": jnp.ones(4)}
    r = jacobian_moments(fn, x, method="exact")
    assert r.in_size == 10 and r.out_size == 14
    J = np.block([[np.asarray(A), np.asarray(B)], [np.zeros((4, 6)), 2 * np.eye(4)]])
    ev = np.linalg.eigvalsh(J @ J.T)
    np.testing.assert_allclose([r.phi, r.phi2], [ev.mean(), (ev**2).mean()], rtol=1e-5)
    h = jacobian_moments(fn, x, key=KEY, num_probes=128)
    assert_within(h.phi, h.phi_sem, ev.mean())


def test_batch_coupled_function_matches_theory_projection():
    """Training-mode second-moment normalization of one channel (derivations §8):
    φ = (1 − 1/M)/m̄², ϕ = (M−1)/(M² m̄⁴) with γ = 1, ε → 0."""
    M = 256
    x = jax.random.normal(jax.random.key(17), (M,)) * 0.7
    fn = lambda z: z / jnp.sqrt(jnp.mean(z**2))
    rms2 = float(jnp.mean(x**2))
    e = jacobian_moments(fn, x, method="exact")
    np.testing.assert_allclose(e.phi, (1 - 1 / M) / rms2, rtol=1e-4)
    np.testing.assert_allclose(e.varphi, (M - 1) / M**2 / rms2**2, rtol=1e-3)
    h = jacobian_moments(fn, x, key=KEY, num_probes=64, method="hutch++")
    assert_within(h.phi, h.phi_sem, (1 - 1 / M) / rms2)


def test_operators_are_transposes_of_each_other():
    fn = mlp(jax.random.key(18), [20, 30, 10], jnp.tanh, 1.0)
    x = jax.random.normal(jax.random.key(19), (20,))
    ops = gne_jax.jacobian_operators(fn, x)
    J = jax.jacfwd(fn)(x)
    u = jax.random.normal(jax.random.key(20), (20,))
    v = jax.random.normal(jax.random.key(21), (10,))
    np.testing.assert_allclose(ops.jvp(u), J @ u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.vjp(v), J.T @ v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.jjt(v), J @ (J.T @ v), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ops.jtj(u), J.T @ (J @ u), rtol=1e-5, atol=1e-6)
    assert (ops.in_size, ops.out_size) == (20, 10)


# --- bad input ------------------------------------------------------------------------


def test_bad_inputs_get_clear_errors():
    fn = lambda x: jnp.tanh(x)
    x = jnp.ones(8)
    with pytest.raises(ValueError, match="num_probes"):
        jacobian_moments(fn, x, key=KEY, num_probes=1)
    with pytest.raises(TypeError, match="num_probes"):
        jacobian_moments(fn, x, key=KEY, num_probes=8.0)
    with pytest.raises(ValueError, match="num_probes"):
        jacobian_moments(fn, x, key=KEY, num_probes=3, method="hutch++")
    with pytest.raises(TypeError, match="key"):
        jacobian_moments(fn, x, key=42)
    with pytest.raises(TypeError, match="key"):
        jacobian_moments(fn, x, key=jnp.ones(3))
    with pytest.raises(TypeError, match="key"):
        jacobian_moments(fn, x)
    with pytest.raises(ValueError, match="method"):
        jacobian_moments(fn, x, key=KEY, method="lanczos")
    with pytest.raises(ValueError, match="normalize"):
        jacobian_moments(fn, x, key=KEY, normalize="both")
    with pytest.raises(TypeError, match="`x` must contain floating-point"):
        jacobian_moments(fn, jnp.ones(8, jnp.int32), key=KEY)
    with pytest.raises(ValueError, match="exact_max_entries"):
        jacobian_moments(fn, jnp.ones(100), method="exact", exact_max_entries=1000)
    # the user may raise the limit
    r = jacobian_moments(fn, jnp.ones(100), method="exact", exact_max_entries=10_000)
    np.testing.assert_allclose(r.phi, (1 - np.tanh(1.0) ** 2) ** 2, rtol=1e-5)


def test_input_that_fn_rejects_names_the_argument():
    W = jnp.ones((4, 5))
    with pytest.raises(ValueError, match=r"`fn` rejected the input `x`.*\(3,\)"):
        jacobian_moments(lambda z: W @ z, jnp.ones(3), key=KEY)
    with pytest.raises(TypeError, match="`exact_max_entries` must be a Python int"):
        jacobian_moments(jnp.tanh, jnp.ones(3), method="exact", exact_max_entries="big")
    with pytest.raises(ValueError, match="`exact_max_entries` must be >= 1"):
        jacobian_moments(jnp.tanh, jnp.ones(3), method="exact", exact_max_entries=-1)


def test_non_finite_output_raises_clear_error():
    with pytest.raises(FloatingPointError, match="fn\\(x\\)` is non-finite"):
        jacobian_moments(lambda z: jnp.log(z), -jnp.ones(4), key=KEY, num_probes=4)
    with pytest.raises(FloatingPointError, match="`x` contains non-finite"):
        jacobian_moments(jnp.tanh, jnp.array([1.0, jnp.nan]), key=KEY, num_probes=4)
    # under an outer jit no exception can be raised: the flag says it instead
    r = jax.jit(lambda z: jacobian_moments(jnp.log, z, key=KEY, num_probes=4))(-jnp.ones(4))
    assert not bool(r.finite)


def test_raw_uint32_key_accepted_and_float64_respected():
    x = jnp.ones(16)
    r = jacobian_moments(jnp.tanh, x, key=jax.random.PRNGKey(0), num_probes=4)
    assert r.phi.dtype == jnp.float32
    with jax.enable_x64(True):
        r64 = jacobian_moments(jnp.tanh, jnp.ones(16, jnp.float64), key=KEY, num_probes=4)
        assert r64.phi.dtype == jnp.float64


def test_float16_input_above_65504_elements_gives_the_right_number():
    # 70,000 float16 entries: the size and the squared norms must not overflow float16
    m = jacobian_moments(lambda z: 0.5 * z, jnp.ones(70000, jnp.float16), key=jax.random.key(0),
                         num_probes=4)
    assert m.phi.dtype == jnp.float32
    np.testing.assert_allclose(float(m.phi), 0.25, rtol=1e-3)
    np.testing.assert_allclose(float(m.varphi), 0.0, atol=1e-3)


def test_varphi_cancellation_is_covered_by_its_standard_error_and_spread_is_scale_free():
    # φ = 1e6, ϕ = 0 exactly: φ₂ − φ² cancels in float32; the SE carries the rounding floor
    m = jacobian_moments(lambda x: 1000 * x, jnp.ones(4096), key=jax.random.key(0))
    assert abs(float(m.varphi)) <= 2 * float(m.varphi_sem)
    assert float(m.varphi_sem) < 1e-4 * float(m.phi) ** 2  # still a tight statement
    small = jacobian_moments(lambda x: x, jnp.ones(4096), key=jax.random.key(0))
    assert abs(float(m.spread)) < 1e-5 and abs(float(small.spread)) < 1e-6
    # spread = ϕ/φ² does not depend on the scale of the map
    A = np.random.default_rng(0).standard_normal((30, 20)) / np.sqrt(20)
    a = jacobian_moments(linear(A), jnp.ones(20), method="exact")
    b = jacobian_moments(linear(50 * A), jnp.ones(20), method="exact")
    np.testing.assert_allclose(float(a.spread), float(b.spread), rtol=1e-4)


def test_zero_size_and_complex_inputs_are_refused_before_any_work():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="`x` is empty"):
        jacobian_moments(lambda z: z, jnp.ones((0, 3)), key=key)
    with pytest.raises(TypeError, match="`x` has a complex leaf"):
        jacobian_moments(lambda z: z, jnp.ones(3, jnp.complex64), key=key)
    with pytest.raises(TypeError, match="num_probes"):
        jacobian_moments(lambda z: z, jnp.ones(3), key=key, num_probes=2.5)
    with pytest.raises(TypeError, match="positional"):
        jacobian_moments(lambda z: z, jnp.ones(3), jax.random.key(0))  # key is keyword-only


def test_non_finite_errors_name_the_true_cause():
    key = jax.random.key(0)
    with pytest.raises(FloatingPointError, match="`x` contains non-finite"):
        jacobian_moments(lambda z: 2 * z, jnp.array([1.0, jnp.nan]), key=key)
    # an inf that a saturating function maps to a finite output (J = 0 there), not φ = 0
    for method in ("hutchinson", "exact"):
        with pytest.raises(FloatingPointError, match="`x` contains non-finite"):
            jacobian_moments(jnp.tanh, jnp.array([jnp.inf, jnp.inf]), key=key, method=method)
    r = jax.jit(lambda z: jacobian_moments(jnp.tanh, z, key=key))(jnp.full(2, jnp.inf))
    assert not bool(r.finite)
    w = jnp.array([[1.0, jnp.nan], [0.0, 1.0]])
    with pytest.raises(FloatingPointError, match="NaN weight"):
        jacobian_moments(lambda z: w @ z, jnp.ones(2), key=key)
    with pytest.raises(FloatingPointError, match="float16"):  # overflow of the dtype
        jacobian_moments(lambda z: 300.0 * z, jnp.full(4, 300.0, jnp.float16), key=key)


def test_results_are_pytrees_with_static_sizes_through_jit_vmap_and_tree_map():
    A = jnp.asarray(np.random.default_rng(1).standard_normal((6, 4)), jnp.float32)
    fn = lambda x: A @ x  # noqa: E731
    x, key = jnp.ones(4), jax.random.key(0)
    eager = jacobian_moments(fn, x, key=key, num_probes=8)
    jitted = jax.jit(lambda z, k: jacobian_moments(fn, z, key=k, num_probes=8))(x, key)
    batched = jax.vmap(lambda k: jacobian_moments(fn, x, key=k, num_probes=8))(
        jax.random.split(key, 3))
    mapped = jax.tree.map(lambda a: a, eager)
    for r in (eager, jitted, batched, mapped):
        assert (r.size, r.out_size, r.in_size, r.num_matvecs) == (6, 6, 4, 8)
        assert all(type(v) is int for v in (r.size, r.out_size, r.in_size, r.num_matvecs))
    assert batched.phi.shape == (3,)
    np.testing.assert_allclose(jitted.phi, eager.phi, rtol=1e-6)
    est = jax.jit(lambda k: gne_jax.hutchinson(8)(lambda v: v, jnp.ones(5), key=k))(key)
    assert est.num_matvecs == 8 and type(est.num_matvecs) is int


def test_old_names_work_with_a_deprecation_warning():
    mv, like, key = (lambda v: 2.0 * v), jnp.ones(6), jax.random.key(0)
    with pytest.warns(DeprecationWarning, match="probe_chunk"):
        a = gne_jax.hutchinson(6, chunk_size=2)(mv, like, key=key)
    with pytest.warns(DeprecationWarning, match="key"):
        b = gne_jax.hutchinson(6)(mv, key, like)
    np.testing.assert_allclose(a.value, b.value)
    with pytest.warns(DeprecationWarning, match="num_probes") as record:
        t = gne_jax.hessian_trace(lambda p: jnp.sum(p**2), like, key=key, num_matvecs=4)
    assert t.num_matvecs == 4
    # each warning points at the caller's line, however deep in the package it is raised
    # (Python's default filters show it only when that line is in __main__)
    with pytest.warns(DeprecationWarning) as more:
        gne_jax.hessian_group_traces(lambda p: jnp.sum(p["w"] ** 2), {"w": like}, key=key,
                                     num_matvecs=4)
        gne_jax.curvature.trace(mv, like, key=key, chunk_size=2, num_probes=4)
        gne_jax.log_norms(jnp.tanh, like, key=key, dist="gaussian", num_probes=2)
    # ...also when the package function is handed to a JAX transformation directly
    with pytest.warns(DeprecationWarning) as through_jax:
        jax.vmap(functools.partial(gne_jax.log_norms, jnp.sin, dist="gaussian", num_probes=2))(
            jnp.ones((2, 6)), key=jax.random.split(key, 2))
    assert [w.filename for w in (*record, *more, *through_jax)] == [__file__] * (
        1 + len(more) + len(through_jax)), [(w.filename, w.lineno)
                                            for w in (*record, *more, *through_jax)]
