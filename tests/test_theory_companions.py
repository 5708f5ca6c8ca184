"""Companion results (derivations §14) beside measurements on small networks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gne_jax.probes.moments import jacobian_moments
from gne_jax.theory import (
    bn_isometry,
    log_norms,
    pool_inits,
    predict,
    resnet_spectrum,
    sample_variance,
)
from gne_jax.theory import components as C
from gne_jax.theory.compose import Repeat, Residual

# ---------------------------------------------------------------------------
# Tarnowski et al.
# ---------------------------------------------------------------------------


def test_tarnowski_table_values():
    # derivations §14.1 table: moments and edges at c = 0.25, 0.5, 1
    table = {
        0.25: (1.2840, 2.473, 0.2362, 4.234),
        0.5: (1.6487, 5.437, 0.1249, 8.008),
        1.0: (2.7183, 22.167, 0.0474, 21.094),
    }
    for c, (m1, m2, lo, hi) in table.items():
        m = resnet_spectrum.tarnowski_moments(c)
        assert float(m.phi) == pytest.approx(m1, abs=1e-4)
        assert float(m.phi2) == pytest.approx(m2, abs=1e-3)
        assert float(m.lower_edge) == pytest.approx(lo, abs=1e-4)
        assert float(m.upper_edge) == pytest.approx(hi, abs=1e-3)
        assert float(m.lower_edge * m.upper_edge) == pytest.approx(1.0, rel=1e-5)


def test_tarnowski_density_integrates_to_the_moments():
    """The numerically solved density has mass 1, moments e^c, (1+2c)e^{2c}, E log λ = 0."""
    with jax.enable_x64(True):
        for c in (0.25, 1.0):
            lo, hi = resnet_spectrum.spectrum_edges(c)
            t = np.linspace(np.log(float(lo)), np.log(float(hi)), 3001)
            g = np.exp(t)
            w = np.asarray(jax.jit(resnet_spectrum.density, static_argnums=())(g, c)) * g
            m = resnet_spectrum.tarnowski_moments(c)
            assert np.trapezoid(w, t) == pytest.approx(1.0, abs=1e-4)
            assert np.trapezoid(w * g, t) == pytest.approx(float(m.phi), rel=1e-4)
            assert np.trapezoid(w * g * g, t) == pytest.approx(float(m.phi2), rel=1e-4)
            assert abs(np.trapezoid(w * t, t)) < 1e-5
            outside = np.asarray(resnet_spectrum.density(np.array([0.8 * lo, 1.2 * hi]), c))
            assert np.all(outside < 1e-6)


def _linear_resnet(Ws):
    def fn(x):
        return jax.lax.scan(lambda h, W: (h + h @ W, None), x, Ws)[0]

    return fn


@pytest.mark.parametrize("c", [0.5, 1.0])
def test_tarnowski_moments_linear_resnet(c):
    """φ and φ₂ of a linear ResNet (post form) vs e^c and (1+2c)e^{2c}.

    Tolerance: 4·SE (across inits, Hutchinson probes) plus the finite-depth/width gap
    between the infinite-L law and the serial composition of the L actual residual
    blocks (I + W, W Gaussian with φ = c/L) — which is itself checked to 4·SE.
    """
    N, L, seeds = 200, 32, 8

    def one(key):
        kw, kp = jax.random.split(key)
        Ws = jax.random.normal(kw, (L, N, N)) * math.sqrt(c / (N * L))
        m = jacobian_moments(_linear_resnet(Ws), jnp.ones(N), key=kp, num_probes=16)
        return m.phi, m.phi2

    meas = pool_inits(*jax.lax.map(one, jax.random.split(jax.random.key(0), seeds)))
    law = resnet_spectrum.tarnowski_moments(c)
    finite = predict(Repeat(Residual(C.dense_gaussian(N, N, sigma2=c / (N * L))), L))
    for name, lawv, fin, mv, se in (
        ("phi", law.phi, finite.phi, meas.phi, meas.phi_sem),
        ("phi2", law.phi2, finite.phi2, meas.phi2, meas.phi2_sem),
    ):
        assert abs(float(mv - fin)) < 4 * float(se), (name, float(mv), float(fin), float(se))
        tol = 4 * float(se) + abs(float(lawv - fin))
        assert abs(float(mv - lawv)) < tol, (name, float(mv), float(lawv), tol)


def _exact_spectrum(N, L, c, key):
    Ws = jax.random.normal(key, (L, N, N)) * math.sqrt(c / (N * L))
    J = jax.jacfwd(_linear_resnet(Ws))(jnp.ones(N))
    return np.linalg.eigvalsh(np.asarray(J @ J.T, dtype=np.float64))


def _ks_distance(ev, c):
    """Kolmogorov–Smirnov distance sup |F_emp − F_pred| between the exact eigenvalues
    and the predicted spectral CDF (the integrated Tarnowski density)."""
    ev = np.sort(ev)
    F = np.asarray(resnet_spectrum.cdf(ev, c, num_points=801))
    n = len(ev)
    return max(np.max(np.arange(1, n + 1) / n - F), np.max(F - np.arange(n) / n))


def _check_spectrum(N, L, c, key):
    ev = _exact_spectrum(N, L, c, key)
    # Bound: the 99% critical value of the KS statistic for N i.i.d. samples,
    # 1.63/√N. Eigenvalues are more rigid than i.i.d. draws, so this is conservative
    # for the sampling part; it also covers the O(1/N) edge effects.
    ks = _ks_distance(ev, c)
    assert ks < 1.63 / math.sqrt(N), ks
    # The robust invariants of derivations §14.1 (within about 1% there).
    assert abs(np.log(ev).mean()) < 0.02
    assert np.log(ev.mean()) - np.log(ev).mean() == pytest.approx(c, rel=0.03)
    assert abs((ev < 1).mean() - 0.5) < 0.02
    # λ_min: finite-N edge fluctuations scale like N^(−2/3) (Tracy–Widom)
    lo = float(resnet_spectrum.spectrum_edges(c)[0])
    assert ev.min() == pytest.approx(lo, rel=3 * N ** (-2 / 3))
    return ks


def test_tarnowski_density_against_exact_eigenvalues_small():
    _check_spectrum(200, 50, 1.0, jax.random.key(1))


@pytest.mark.slow
@pytest.mark.parametrize("c", [0.5, 1.0])
def test_tarnowski_density_against_exact_eigenvalues_N400_L100(c):
    _check_spectrum(400, 100, c, jax.random.key(2))


def test_tarnowski_c_from_branches():
    # ReLU branch with σ² = 2: c = σ²/2 = 1; linear: c = σ²
    L = 10
    relu_phi = float(C.relu().moments(1.0).phi) * 2.0 / L
    assert float(resnet_spectrum.resnet_c([relu_phi] * L)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="c must be"):
        resnet_spectrum.tarnowski_moments(-1.0)
    # derivations §14.1 "c per activation" table at q = 0.25 / 1 / 2 (σ² = 1)
    table = {
        "tanh": (C.tanh(), (0.7174, 0.4644, 0.3495)),
        "sigmoid": (C.sigmoid(), (0.0560, 0.0448, 0.0370)),
        "hard_tanh": ("hard_tanh", (0.9545, 0.6827, 0.5205)),
    }
    for act, values in table.values():
        for q, want in zip((0.25, 1.0, 2.0), values, strict=True):
            got = float(resnet_spectrum.resnet_c_for_activation(1.0, act, q))
            assert got == pytest.approx(want, abs=5e-5), (act, q)
    assert float(resnet_spectrum.resnet_c_for_activation(2.0, C.relu())) == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# Luther & Seung
# ---------------------------------------------------------------------------


def test_luther_table_values():
    table = {1: 0.6817, 2: 0.5063, 3: 0.3952, 5: 0.2641, 10: 0.1285, 20: 0.0516, 50: 0.0121,
             100: 0.00358, 200: 0.00098}
    with jax.enable_x64(True):
        f = np.asarray(sample_variance.sample_variance_fractions(200))
    for k, v in table.items():
        assert f[k - 1] == pytest.approx(v, abs=_half_digit(v))
    assert float(sample_variance.sample_variance_asymptote(100)) == pytest.approx(0.00444, abs=5e-6)
    assert float(sample_variance.sample_variance_asymptote(200)) == pytest.approx(0.00111, abs=5e-6)


def _half_digit(v):
    s = f"{v:.6g}"
    return 0.5 * 10 ** (-len(s.split(".")[1])) * 1.01


def test_luther_fractions_width_1024():
    """1 − ρ_k after k = 1, 2, 5, 10 ReLU layers of a width-1024 Kaiming network.

    512 white-noise samples, 8 networks; tolerance 4·SE (across networks) plus a
    finite-width allowance k/N (the fluctuations of the empirical kernel bias the
    arc-cosine map at O(1/N) per layer; docs/theory.md quotes the measured bias).
    """
    N, S, K, nets = 1024, 512, 10, 8

    def net(key):
        ks = jax.random.split(key, K + 2)
        h = jax.random.normal(ks[0], (S, N)) @ (jax.random.normal(ks[1], (N, N)) / math.sqrt(N))

        def layer(h, k):
            h = jax.nn.relu(h) @ (jax.random.normal(k, (N, N)) * math.sqrt(2.0 / N))
            # sample variance over the batch / total second moment, averaged over units
            return h, 1 - jnp.mean(jnp.mean(h, 0) ** 2) / jnp.mean(h**2)

        return jax.lax.scan(layer, h, ks[2:])[1]

    frac = np.asarray(jax.lax.map(net, jax.random.split(jax.random.key(7), nets)))
    mean, se = frac.mean(0), frac.std(0, ddof=1) / math.sqrt(nets)
    pred = np.asarray(sample_variance.sample_variance_fractions(K))
    for k in (1, 2, 5, 10):
        tol = 4 * se[k - 1] + k / N
        assert abs(mean[k - 1] - pred[k - 1]) < tol, (k, mean[k - 1], pred[k - 1], tol)


# ---------------------------------------------------------------------------
# Orvieto, Kohler et al.
# ---------------------------------------------------------------------------


def test_orvieto_table_values():
    relu = {8: -0.3988, 16: -0.1764, 32: -0.0825, 64: -0.0401, 128: -0.0198}
    lin = {8: -0.1302, 16: -0.0638, 32: -0.0316, 64: -0.0157, 128: -0.0078}
    with jax.enable_x64(True):
        for d in relu:
            assert float(log_norms.relu_log_norm_rate(d)) == pytest.approx(relu[d], abs=5e-5)
            assert float(log_norms.linear_log_norm_rate(d)) == pytest.approx(lin[d], abs=5e-5)
            assert float(log_norms.linear_log_norm_rate(d)) == pytest.approx(
                -1 / d - 1 / (3 * d * d), abs=2 / d**3)
        assert log_norms.CHAIN_MEAN_LOG_ABS_W == pytest.approx(-0.6352, abs=5e-5)
        assert log_norms.CHAIN_VAR_LOG_ABS_W == pytest.approx(1.234, abs=5e-4)
        law = log_norms.log_norm_law(16, 16)
        assert float(law.mean_log) == pytest.approx(-1.021, abs=5e-4)  # table: (−1.021)
        assert float(log_norms.log_norm_law(64, 64, activation="relu").mean_log) == pytest.approx(
            -2.57, abs=5e-3)
    with pytest.raises(ValueError, match="activation"):
        log_norms.log_norm_law(16, 4, activation="gelu")


@pytest.mark.parametrize("d", [16, 64])
def test_orvieto_linear_log_norm_law(d):
    """Mean over seeds of ln(‖x_L‖²/‖x₀‖²) for forward vectors and of ln(‖u_L‖²/‖u₀‖²) for
    backward vectors u ← Wᵀu (equal in law to the VJP of the net, the layers being
    i.i.d.), linear Xavier net, vs L·(ψ(d/2) − ln(d/2)); variance vs L·ψ'(d/2). The law
    is exact at any width, so the tolerance is 4·SE only."""
    L, seeds = 32, 1000
    keys = jax.random.split(jax.random.key(d), L + 1)
    x0 = jax.random.normal(keys[0], (2, seeds, d))

    def layer(h, key):  # weights drawn on the fly: memory O(seeds·d²) per layer
        W = jax.random.normal(key, (seeds, d, d)) / math.sqrt(d)
        return jnp.stack([jnp.einsum("sij,sj->si", W, h[0]),
                          jnp.einsum("sji,sj->si", W, h[1])]), None

    xL = jax.lax.scan(layer, x0, keys[1:])[0]
    logs2 = np.asarray(jnp.log(jnp.sum(xL**2, -1) / jnp.sum(x0**2, -1)))
    law = log_norms.log_norm_law(d, L)
    for logs in logs2:
        se = logs.std(ddof=1) / math.sqrt(seeds)
        assert abs(logs.mean() - float(law.mean_log)) < 4 * se, (logs.mean(), float(law.mean_log))
        # sample variance of a roughly normal variable: relative SE √(2/(S−1))
        assert logs.var(ddof=1) == pytest.approx(float(law.var_log), rel=4 * math.sqrt(2 / seeds))
        # the median network shrinks while the mean of the norm ratio is ≈ 1
        assert np.median(logs) < 0 and float(law.median) < 1


@pytest.mark.slow
def test_orvieto_relu_per_layer_rate_d64():
    """ReLU He net, d = L = 64, 2000 nets: mean of ln(‖x_L‖²/‖x₀‖²) vs L·E ln R (exact law
    given K ≥ 1; K = 0 has probability 2⁻⁶⁴). derivations §14.3 MC: −2.55 vs −2.57."""
    d, L, seeds = 64, 64, 2000
    keys = jax.random.split(jax.random.key(0), L + 1)
    x0 = jax.random.normal(keys[0], (seeds, d))

    def layer(h, key):
        W = jax.random.normal(key, (seeds, d, d)) * math.sqrt(2.0 / d)
        return jax.nn.relu(jnp.einsum("sij,sj->si", W, h)), None

    xL = jax.lax.scan(layer, x0, keys[1:])[0]
    logs = np.asarray(jnp.log(jnp.sum(xL**2, -1) / jnp.sum(x0**2, -1)))
    assert np.all(np.isfinite(logs))
    se = logs.std(ddof=1) / math.sqrt(seeds)
    pred = L * float(log_norms.relu_log_norm_rate(d))
    assert abs(logs.mean() - pred) < 4 * se, (logs.mean(), se, pred)
    assert logs.var(ddof=1) == pytest.approx(L * 5.0 / d, rel=0.15)  # Var ln R ≈ 5/d


# ---------------------------------------------------------------------------
# Meterez et al.
# ---------------------------------------------------------------------------


def _haar_np(rng, count, d):
    """``count`` Haar-orthogonal d×d matrices (numpy QR with the sign fix of Mezzadri)."""
    q, r = np.linalg.qr(rng.standard_normal((count, d, d)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def test_isometry_gap_basics():
    with jax.enable_x64(True):
        O = jnp.asarray(_haar_np(np.random.default_rng(0), 1, 8)[0])
        assert float(bn_isometry.isometry_gap(3.0 * O)) == pytest.approx(0.0, abs=1e-10)
        X = jnp.diag(jnp.array([1.0, 2.0, 4.0]))
        ev = np.array([1.0, 4.0, 16.0])
        assert float(bn_isometry.isometry_gap(X)) == pytest.approx(
            np.log(ev.mean()) - np.log(ev).mean())
        geo_over_arith = np.exp(np.log(ev).mean()) / ev.mean()
        assert float(bn_isometry.isometry(X)) == pytest.approx(geo_over_arith)
        assert np.isinf(float(bn_isometry.isometry_gap(jnp.ones((3, 3)))))
        assert float(bn_isometry.theorem1_bound(1.0, 4, 0)) == pytest.approx(1.0)
        assert float(bn_isometry.theorem1_bound(1.0, 4, 80)) == pytest.approx(math.exp(-1.0))
        assert bn_isometry.bn_relu_explosion_rate() == pytest.approx(1.4669, abs=5e-5)
        assert math.sqrt(bn_isometry.bn_relu_explosion_rate()) == pytest.approx(1.2112, abs=5e-5)
        rate = bn_isometry.bn_relu_explosion_rate()
        assert 0.5 * math.log(rate) == pytest.approx(0.1916, abs=5e-5)
    with pytest.raises(ValueError, match="2-D"):
        bn_isometry.isometry_gap(jnp.ones(3))


def test_meterez_theorem3_and_near_isometry_rate():
    """Theorem 3's bound holds (with its large slack) for Haar W at d = 16, and the gap of
    the orthogonal-BN chain decays at the [derived] rate ln(d/(d+2)) per layer."""
    d = 16
    with jax.enable_x64(True):
        X = bn_isometry.meterez_bn(jax.random.normal(jax.random.key(1), (d, d)))
        rng = np.random.default_rng(2)
        Ws = jnp.asarray(_haar_np(rng, 200, d))
        ratios = jax.vmap(lambda W: bn_isometry.isometry(bn_isometry.meterez_bn(W @ X)))(Ws)
        mean, se = float(ratios.mean()), float(ratios.std() / math.sqrt(len(ratios)))
        bound = float(bn_isometry.theorem3_factor(X) * bn_isometry.isometry(X))
        assert mean - 4 * se > bound  # E_W 𝓘(BN(WX)) ≥ factor · 𝓘(X)
        assert float(bn_isometry.corollary4_bound(X)) < float(bn_isometry.isometry_gap(X))

        # near-isometry decay: slope of ln gap over layers 10..50, mean over 4 chains
        L = 50

        def chain(X, Ws):
            def step(X, W):
                X = bn_isometry.meterez_bn(W @ X)
                return X, bn_isometry.isometry_gap(X)

            return jax.lax.scan(step, bn_isometry.meterez_bn(X), Ws)[1]

        X0 = jnp.asarray(rng.standard_normal((4, d, d)))
        gaps = np.asarray(jax.vmap(chain)(X0, jnp.asarray(_haar_np(rng, 4 * L, d)).reshape(
            4, L, d, d)))
        layers = np.arange(10, L)
        slopes = [np.polyfit(layers, np.log(g[10:]), 1)[0] for g in gaps]
        pred = math.log(bn_isometry.near_isometry_rate(d))
        se = np.std(slopes, ddof=1) / 2
        assert abs(np.mean(slopes) - pred) < 4 * se + 0.1 * abs(pred), (slopes, pred)


@pytest.mark.slow
def test_bn_relu_explosion_rate():
    """Gaussian Kaiming weights + mean-centred BN + ReLU, width = batch = 256: per-layer
    growth of the mean squared input gradient vs π/(π−1). derivations §14.2 measured 1.441 at
    256 (approaching from below as B grows); tolerance 4·SE + that finite-B gap (0.03)."""
    n = B = 256
    depth = 40

    def net_grads(key):
        kx, kw, kv = jax.random.split(key, 3)
        Ws = jax.random.normal(kw, (depth, n, n)) * math.sqrt(2.0 / n)
        v = jax.random.normal(kv, (B, n))

        def step(h, W):
            z = h @ W
            z = (z - z.mean(0)) / jnp.sqrt(z.var(0) + 1e-5)
            return jax.nn.relu(z), h

        def loss(x):
            out, _ = jax.lax.scan(step, x, Ws)
            return jnp.sum(out * v)

        # gradient w.r.t. every layer input: differentiate w.r.t. additive perturbations
        def loss_eps(eps):
            def step_e(h, args):
                W, e = args
                h = h + e
                z = h @ W
                z = (z - z.mean(0)) / jnp.sqrt(z.var(0) + 1e-5)
                return jax.nn.relu(z), None

            out, _ = jax.lax.scan(step_e, jax.random.normal(kx, (B, n)), (Ws, eps))
            return jnp.sum(out * v)

        g = jax.grad(loss_eps)(jnp.zeros((depth, B, n)))
        return jnp.sum(g**2, axis=(1, 2))

    g2 = np.asarray(jax.lax.map(net_grads, jax.random.split(jax.random.key(0), 3)))
    rates = np.exp(-np.array([np.polyfit(np.arange(5, 35), np.log(g[5:35]), 1)[0] for g in g2]))
    se = rates.std(ddof=1) / math.sqrt(len(rates))
    assert abs(rates.mean() - bn_isometry.bn_relu_explosion_rate()) < 4 * se + 0.03, rates
