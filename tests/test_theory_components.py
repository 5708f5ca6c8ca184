"""Component library (derivations §8): pinned table values, independent quadrature,
and single-layer Jacobians measured with the library's probes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from gne_jax.probes.moments import jacobian_moments
from gne_jax.theory import components as C
from gne_jax.theory import pool_inits, predict

# derivations §8.1: q, tanh φ, tanh ϕ, sigmoid φ, sigmoid ϕ
TANH_TABLE = [
    (0.01, 0.9807, 0.00070, 0.06219, 2e-7),
    (0.1, 0.8492, 0.02864, 0.05962, 1.4e-5),
    (0.25, 0.7174, 0.07049, 0.05603, 6.0e-5),
    (0.5, 0.5924, 0.10503, 0.05136, 1.45e-4),
    (1.0, 0.4644, 0.12584, 0.04484, 2.75e-4),
    (2.0, 0.3495, 0.12711, 0.03703, 4.1e-4),
    (4.0, 0.2560, 0.11370, 0.02903, 4.9e-4),
]


def _half_ulp(v: float) -> float:
    """Half a unit in the last printed digit of a table value (2-4 significant digits)."""
    s = f"{v:.6g}"
    if "e" in s:
        mant, exp = s.split("e")
        dec = len(mant.split(".")[1]) if "." in mant else 0
        return 0.5 * 10 ** (int(exp) - dec)
    dec = len(s.split(".")[1]) if "." in s else 0
    return 0.5 * 10 ** (-dec)


@pytest.mark.parametrize("row", TANH_TABLE, ids=lambda r: f"q={r[0]}")
def test_tanh_sigmoid_table(row):
    q, tphi, tvar, sphi, svar = row
    with jax.enable_x64(True):
        t, s = C.tanh_moments(q), C.sigmoid_moments(q)
        got = [float(t.phi), float(t.varphi), float(s.phi), float(s.varphi)]
    for g, want in zip(got, [tphi, tvar, sphi, svar], strict=True):
        assert abs(g - want) <= _half_ulp(want) * 1.01, (q, g, want)


def test_tanh_quadrature_against_scipy_and_small_q_series():
    def ref(q, k):
        f = lambda x: np.cosh(x) ** (-k) * np.exp(-x * x / (2 * q)) / np.sqrt(2 * np.pi * q)
        return integrate.quad(f, -40, 40, epsabs=1e-13, limit=200)[0]

    with jax.enable_x64(True):
        for q in (0.05, 0.7, 3.0):
            m = C.tanh_moments(q)
            p, p2 = ref(q, 4), ref(q, 8)
            # GH(256) error grows with q: ~1e-9 (φ), ~1.5e-7 (ϕ) at q = 3
            assert abs(float(m.phi) - p) < 1e-8
            assert abs(float(m.varphi) - (p2 - p * p)) < 5e-7
            m = C.tanh_moments(q, method="trapezoid")
            assert abs(float(m.phi) - p) < 1e-11
            assert abs(float(m.varphi) - (p2 - p * p)) < 1e-11
        q = 1e-3  # φ ≈ 1 − 2q + 7q², ϕ ≈ 8q²
        m = C.tanh_moments(q)
        assert abs(float(m.phi) - (1 - 2 * q + 7 * q * q)) < 1e-7
        assert abs(float(m.varphi) / (8 * q * q) - 1) < 20 * q  # next order: relative O(q)


def test_smooth_activation_matches_closed_forms():
    with jax.enable_x64(True):
        gen = C.smooth_activation(jnp.tanh, "tanh")
        for q in (0.1, 1.0):
            a, b = gen.moments(q), C.tanh_moments(q)
            assert abs(float(a.phi - b.phi)) < 1e-12 and abs(float(a.varphi - b.varphi)) < 1e-12
        sig = C.smooth_activation(jax.nn.sigmoid, "sigmoid")
        a, b = sig.moments(0.5), C.sigmoid_moments(0.5)
        assert abs(float(a.phi - b.phi)) < 1e-12


def test_selu_row_and_shared_solver():
    from gne_jax.nn.activations import selu_derivative_moment, selu_second_moment
    from gne_jax.theory import depth_aware_selu, selu_coefficients

    with jax.enable_x64(True):
        lam, alpha = 1.0507009873554805, 1.6732632423543772
        m = C.selu_moments(lam, alpha, 1.0)
        assert abs(float(m.phi) - 1.0716) < 5e-5 and abs(float(m.varphi) - 0.3631) < 5e-5
        assert abs(float(C.selu(lam, alpha).forward(1.0)) - 1.0) < 1e-4  # table: 1.00002
        # independent: the layers module's φ formula and scipy quadrature of selu'⁴
        assert abs(float(m.phi) - selu_derivative_moment(lam, alpha, 1.0)) < 1e-10
        d4 = lambda x: (lam * alpha * np.exp(x)) ** 4 * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
        phi2 = integrate.quad(d4, -40, 0)[0] + lam**4 / 2
        assert abs(float(m.phi2) - phi2) < 1e-9
        # the depth-aware component: block φ = γ₀·φ_selu = 1 + ε, q a fixed point
        for eps, g0 in ((0.03, 1.0), (0.03, 2.0), (0.0716, 1.0)):
            lam, alpha = selu_coefficients(eps, g0, 1.0)
            comp = depth_aware_selu(eps, g0, 1.0)
            assert abs(g0 * float(comp.moments(g0).phi) - (1 + eps)) < 1e-8
            assert abs(float(comp.forward(g0)) - 1.0) < 1e-8
            assert abs(float(comp.forward(g0)) - selu_second_moment(lam, alpha, g0)) < 1e-10


def test_activation_table_values():
    with jax.enable_x64(True):
        # derivations §9: r_act for leaky ReLU 0.18 / 0.3 / 0.5
        for a, r in ((0.18, 0.878), (0.3, 0.697), (0.5, 0.360)):
            assert abs(float(C.leaky_relu(a).moments(1.0).normalized_variance) - r) < 5e-4
        m = C.prelu(0.25).moments(1.0)  # PReLU at init
        assert float(m.phi) == pytest.approx(0.53125)
        assert abs(float(m.varphi) - 0.2197) < 5e-5
        assert abs(float(m.normalized_variance) - 0.7785) < 5e-5
        m = C.relu().moments(1.0)
        assert (float(m.phi), float(m.varphi)) == (0.5, 0.25)
        for a in (0.1, 0.25, 0.6):
            m = C.sprelu(a).moments(1.0)
            assert float(m.phi) == pytest.approx(0.5)
            assert float(m.varphi) == pytest.approx(0.25 * ((1 - a * a) / (1 + a * a)) ** 2)
        m = C.relu(p=0.3).moments(1.0)
        assert (float(m.phi), float(m.varphi)) == pytest.approx((0.3, 0.21))


def _exact(fn, x):
    return jacobian_moments(fn, x, method="exact")


def test_normalization_rows_exact_against_jacobian():
    """Training-mode BN / SMN over one channel of M values: closed forms vs exact J (float64)."""
    with jax.enable_x64(True):
        M, gamma = 50, 1.7
        x = 2.0 * jax.random.normal(jax.random.key(0), (M,))
        x = x - x.mean()  # zero-mean input: σ_B² = q_in = mean(x²)
        q = float(jnp.mean(x**2))
        for eps in (0.0, 0.3):
            bn = lambda v, eps=eps: gamma * (v - v.mean()) / jnp.sqrt(v.var() + eps)
            pred = C.batchnorm_train(M, gamma=gamma, eps=eps).moments(q)
            meas = _exact(bn, x)
            assert float(meas.phi) == pytest.approx(float(pred.phi), rel=1e-9)
            assert float(meas.varphi) == pytest.approx(float(pred.varphi), rel=1e-9)
        y = 1.5 + jax.random.normal(jax.random.key(1), (M,))  # SMN: no centring needed
        qy = float(jnp.mean(y**2))
        for eps in (0.0, 0.2):
            smn = lambda v, eps=eps: gamma * v / (jnp.sqrt(jnp.mean(v**2)) + eps)
            pred = C.smn_train(M, gamma=gamma, eps=eps).moments(qy)
            meas = _exact(smn, y)
            assert float(meas.phi) == pytest.approx(float(pred.phi), rel=1e-9)
            assert float(meas.varphi) == pytest.approx(float(pred.varphi), rel=1e-9)
            assert float(jnp.mean(smn(y) ** 2)) == pytest.approx(
                float(C.smn_train(M, gamma=gamma, eps=eps).forward(qy)), rel=1e-9)
        # normalized variances 2/(M−2) and 1/(M−1)
        assert float(C.batchnorm_train(M).moments(1.0).normalized_variance) == pytest.approx(
            2 / (M - 2))
        assert float(C.smn_train(M).moments(1.0).normalized_variance) == pytest.approx(1 / (M - 1))


def test_linear_rows_measured():
    """Dense Gaussian, orthogonal (both shapes), dropout and pooling against the probes."""
    from gne_jax.nn.initializers import kaiming_normal, orthogonal

    n, m = 300, 150
    keys = jax.random.split(jax.random.key(2), 16)

    def dense(k):
        W = kaiming_normal(np.sqrt(2.0))(k, (n, m))
        r = jacobian_moments(lambda v: v @ W, jnp.ones(n), method="exact")
        return r.phi, r.phi2

    res = jax.lax.map(dense, keys)
    meas, pred = pool_inits(*res), C.dense_gaussian(n, m, gain=np.sqrt(2.0)).moments(1.0)
    assert abs(float(meas.phi - pred.phi)) < 4 * float(meas.phi_sem)
    assert abs(float(meas.varphi - pred.varphi)) < 4 * float(meas.varphi_sem)
    # orthogonal: exact for one draw (the rows are exactly orthonormal)
    for a, b in ((120, 80), (80, 120)):
        O = orthogonal(1.3)(jax.random.key(3), (a, b))
        meas = _exact(lambda v, O=O: v @ O, jnp.ones(a))
        pred = C.orthogonal(a, b, gain=1.3).moments(1.0)
        assert float(meas.phi) == pytest.approx(float(pred.phi), rel=1e-4)
        assert float(meas.varphi) == pytest.approx(float(pred.varphi), abs=1e-4)
    # dropout: diag(b/p); the spread across masks is binomial
    p, size = 0.8, 4000
    b = jax.random.bernoulli(jax.random.key(4), p, (size,)).astype(jnp.float32)
    meas = jacobian_moments(lambda v: v * b / p, jnp.ones(size), key=jax.random.key(5),
                            num_probes=4)
    pred = C.dropout(p).moments(1.0)
    se_phi = math.sqrt(pred.varphi / size)
    assert abs(float(meas.phi - pred.phi)) < 4 * se_phi
    # 2×2 average pooling of a 16×16 map, and global pooling: exact
    pool = lambda v: v.reshape(8, 2, 8, 2).mean((1, 3)).reshape(-1)
    meas = _exact(pool, jnp.ones(256))
    assert float(meas.phi) == pytest.approx(float(C.avg_pool(2).moments(1.0).phi))
    assert abs(float(meas.varphi)) < 1e-6
    meas = _exact(lambda v: v.mean(keepdims=True), jnp.ones(64))
    assert float(meas.phi) == pytest.approx(float(C.global_avg_pool(64).moments(1.0).phi))


def test_conv_and_delta_orthogonal_rows():
    """Gaussian conv (circular, stride 1) and delta-orthogonal conv against the probes."""
    from gne_jax.nn.initializers import delta_orthogonal

    H, c_in, c_out, k = 8, 8, 16, 3

    def conv(kernel):
        def f(v):
            x = v.reshape(1, H, H, c_in)
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")  # circular
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return y.reshape(-1)
        return f

    def one(key):
        kern = jax.random.normal(key, (k, k, c_in, c_out)) * math.sqrt(2.0 / (c_in * k * k))
        r = jacobian_moments(conv(kern), jnp.ones(H * H * c_in), method="exact")
        return r.phi, r.phi2

    meas = pool_inits(*jax.lax.map(one, jax.random.split(jax.random.key(6), 8)))
    pred = C.conv_gaussian(c_in, c_out, k, gain=math.sqrt(2.0)).moments(1.0)
    fw = 1.0 / (c_in * k * k)  # derivations §8: ϕ/φ² ≈ c_out/c_in + O(1/fan_in)
    assert abs(float(meas.phi - pred.phi)) < 4 * float(meas.phi_sem) + 1e-6
    assert abs(float(meas.varphi - pred.varphi)) < 4 * float(meas.varphi_sem) + fw * float(
        pred.varphi)
    for ci, co in ((8, 16), (16, 8)):
        kern = delta_orthogonal(1.2, scale_by_fan_ratio=True)(jax.random.key(7), (3, 3, ci, co))

        def f(v, kern=kern, ci=ci):
            x = v.reshape(1, H, H, ci)
            return jax.lax.conv_general_dilated(
                x, kern, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).reshape(-1)

        meas = _exact(f, jnp.ones(H * H * ci))
        pred = C.delta_orthogonal(ci, co, gain=1.2, scale_by_fan_ratio=True).moments(1.0)
        assert float(meas.phi) == pytest.approx(float(pred.phi), rel=1e-4)
        assert float(meas.varphi) == pytest.approx(float(pred.varphi), abs=1e-4)


def test_concat_row():
    from gne_jax.theory.compose import Concat

    cf, cx = 600, 400
    pred = predict(Concat(C.dense_gaussian(cx, cf, sigma2=1.3 / cx), cf, cx))
    # derivations §8 check: 600 + 400 channels, Gaussian J_f (φ_f = 1.3): φ 1.18, φ₂ 4.498
    assert float(pred.phi) == pytest.approx(1.18, abs=1e-4)
    assert float(pred.phi2) == pytest.approx(4.498, abs=2e-3)

    def one(key):
        W = jax.random.normal(key, (cx, cf)) * math.sqrt(1.3 / cx)
        r = jacobian_moments(lambda v: jnp.concatenate([v @ W, v]), jnp.ones(cx),
                             method="exact")
        return r.phi, r.phi2

    meas = pool_inits(*jax.lax.map(one, jax.random.split(jax.random.key(8), 6)))
    assert abs(float(meas.phi - pred.phi)) < 4 * float(meas.phi_sem) + 1e-3
    assert abs(float(meas.phi2 - pred.phi2)) < 4 * float(meas.phi2_sem) + 2.0 / cx * float(
        pred.phi2)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="fan_in"):
        C.dense_gaussian(0, 10)
    with pytest.raises(ValueError, match="keep_prob"):
        C.dropout(1.5)
    with pytest.raises(ValueError, match="M must be"):
        C.batchnorm_train(2)
    with pytest.raises(ValueError, match="q must be"):
        C.tanh_moments(-1.0)
    with pytest.raises(ValueError, match="either sigma2 or gain"):
        C.dense_gaussian(4, 4, sigma2=1.0, gain=1.0)
    with pytest.raises(TypeError, match="network node"):
        predict("relu")
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        C.leaky_relu(float("nan"))
    with pytest.raises(TypeError, match="negative_slope must be a real number"):
        C.leaky_relu("0.3")
    with pytest.raises(ValueError, match="zeta must be finite"):
        C.scale(float("inf"))
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        C.batchnorm_eval(running_var=0.25, eps=-0.5)
    with pytest.raises(ValueError, match="running_var \\+ eps must be > 0"):
        C.batchnorm_eval(running_var=0.0, eps=0.0)
    with pytest.raises(ValueError, match="running_rms \\+ eps must be > 0"):
        C.smn_eval(running_rms=0.0, eps=0.0)
    from gne_jax.theory import Concat, Repeat

    with pytest.raises(ValueError, match="Repeat count must be an integer"):
        predict(Repeat(C.scale(2.0), 2.5))
    with pytest.raises(ValueError, match="Concat needs integer channel counts"):
        predict(Concat(C.identity(), 0, 0))


@pytest.mark.parametrize("make, value, closed_form", [
    (C.leaky_relu, 0.3, lambda a: (1 + a**2) / 2),
    (C.prelu, 0.3, lambda a: (1 + a**2) / 2),
    (C.sprelu, 0.3, lambda a: 0.5),
    (C.dropout, 0.8, lambda p: 1 / p),
    (C.scale, 0.7, lambda z: z**2),
])
def test_component_parameters_can_be_traced(make, value, closed_form):
    """A component's own parameter under jit and vmap (a sweep over slopes or scales) gives
    the eager value and the closed form φ (centred unit input)."""
    eager = float(predict(make(value), 1.0).phi)
    jitted = float(jax.jit(lambda v: predict(make(v), 1.0).phi)(value))
    swept = np.asarray(jax.vmap(lambda v: predict(make(v), 1.0).phi)(jnp.array([value, value])))
    np.testing.assert_allclose([jitted, *swept], eager, rtol=1e-6)
    np.testing.assert_allclose(eager, closed_form(value), rtol=1e-6)
