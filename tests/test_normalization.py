"""Normalization layers against their formulas, finite differences and derivations §8/§12."""

import math
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gne_jax.nn.normalization import (
    CenteredConv,
    CenteredDense,
    MeanOnlyBatchNorm,
    MeterezBatchNorm,
    ScaledWSConv,
    ScaledWSDense,
    SecondMomentNorm,
    WeightNormConv,
    WeightNormDense,
    standardize_kernel,
    weight_norm,
)

KEY = jax.random.key(0)


def _x(shape=(4, 5, 5, 3), seed=1, shift=0.5):
    # non-zero mean so that second moment != variance
    return jax.random.normal(jax.random.key(seed), shape) * 1.7 + shift


X64 = (3, 2, 2, 3)  # float64 tests: M = 12 values per channel


def _smn_reference(x, gamma, beta, eps, variant="l2", inside=False):
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    if variant == "l1":
        stat = np.mean(np.abs(x), axis=axes)
        return gamma * x / (stat + eps) + beta
    ms = np.mean(x**2, axis=axes)
    denom = np.sqrt(ms + eps) if inside else np.sqrt(ms) + eps
    return gamma * x / denom + beta


def _params(c, seed=2):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (
        1.0 + 0.3 * jax.random.normal(k1, (c,)),
        0.2 * jax.random.normal(k2, (c,)),
    )


# ---------------------------------------------------------------- SMN forward


@pytest.mark.parametrize(
    "variant,inside,eps",
    [("l2", False, 1e-5), ("l2", False, 0.3), ("l2", True, 0.3), ("l1", False, 0.3)],
)
def test_smn_forward_matches_formula(variant, inside, eps):
    x = _x()
    gamma, beta = _params(3)
    layer = SecondMomentNorm(variant=variant, epsilon_inside_sqrt=inside, epsilon=eps)
    variables = layer.init(KEY, x, use_running_average=False)
    variables = {"params": {"scale": gamma, "bias": beta}, "batch_stats": variables["batch_stats"]}
    y = layer.apply(variables, x, use_running_average=False)
    ref = _smn_reference(x, np.asarray(gamma), np.asarray(beta), eps, variant, inside)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-6)


def test_smn_unit_second_moment_and_feature_axis():
    # γ = 1, β = 0, ε → 0: each channel has E[y²] = 1; axis=1 (NCHW) agrees with NHWC.
    x = _x()
    layer = SecondMomentNorm(epsilon=0.0)
    v = layer.init(KEY, x, use_running_average=False)
    y = layer.apply(v, x, use_running_average=False)
    np.testing.assert_allclose(np.mean(np.asarray(y) ** 2, axis=(0, 1, 2)), 1.0, rtol=1e-5)
    xc = jnp.moveaxis(x, -1, 1)
    layer_c = SecondMomentNorm(epsilon=0.0, axis=1)
    vc = layer_c.init(KEY, xc, use_running_average=False)
    yc = layer_c.apply(vc, xc, use_running_average=False)
    np.testing.assert_allclose(np.asarray(jnp.moveaxis(yc, 1, -1)), np.asarray(y), rtol=1e-6)


def test_smn_zero_channel_is_finite():
    x = _x().at[..., 1].set(0.0)
    layer = SecondMomentNorm()
    v = layer.init(KEY, x, use_running_average=False)
    g = jax.grad(lambda x: jnp.sum(layer.apply(v, x, use_running_average=False) ** 2))(x)
    assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------- SMN backward


def _smn_fn(layer, x_shape):
    c = x_shape[-1]
    name = "rms" if layer.variant == "l2" else "mean_abs"
    stats = {"batch_stats": {name: jnp.ones((c,))}}

    def f(x, gamma, beta):
        return layer.apply(
            {"params": {"scale": gamma, "bias": beta}, **stats}, x, use_running_average=False
        )

    return f


@pytest.mark.parametrize("variant,inside", [("l2", False), ("l2", True), ("l1", False)])
def test_smn_backward_finite_differences(variant, inside):
    with jax.enable_x64(True):
        x = jnp.asarray(_x(X64), jnp.float64)
        gamma, beta = (jnp.asarray(p, jnp.float64) for p in _params(3))
        layer = SecondMomentNorm(variant=variant, epsilon_inside_sqrt=inside, epsilon=0.1)
        f = _smn_fn(layer, x.shape)
        w = jnp.asarray(np.random.default_rng(0).normal(size=x.shape))

        def loss(x, gamma, beta):  # a generic scalar so every output direction matters
            return jnp.sum(jnp.sin(f(x, gamma, beta)) * w)

        check_grads(
            jax.jit(loss), (x, gamma, beta), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7
        )


@pytest.mark.parametrize("eps", [1e-5, 0.2])
def test_smn_backward_matches_closed_form(eps):
    # derivations §12.2: s = γ/(m̄+ε); ∂β = Σg; ∂γ = Σgx/(m̄+ε); ∂x = s g − s Σgx/(M(m̄+ε)m̄) x
    with jax.enable_x64(True):
        x = jnp.asarray(_x(X64), jnp.float64)
        gamma, beta = (jnp.asarray(p, jnp.float64) for p in _params(3))
        f = _smn_fn(SecondMomentNorm(epsilon=eps), x.shape)
        g = jax.random.normal(jax.random.key(5), x.shape, jnp.float64)
        _, vjp = jax.vjp(f, x, gamma, beta)
        dx, dgamma, dbeta = (np.asarray(t) for t in vjp(g))

        xn, gn, gam = np.asarray(x), np.asarray(g), np.asarray(gamma)
        axes = (0, 1, 2)
        M = xn.shape[0] * xn.shape[1] * xn.shape[2]
        mbar = np.sqrt(np.mean(xn**2, axis=axes))
        s = gam / (mbar + eps)
        sgx = np.sum(gn * xn, axis=axes)
        np.testing.assert_allclose(dbeta, np.sum(gn, axis=axes), rtol=1e-12)
        np.testing.assert_allclose(dgamma, sgx / (mbar + eps), rtol=1e-12)
        ref_dx = s * gn - s * sgx / (M * (mbar + eps) * mbar) * xn
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------- running statistics


def test_smn_running_stats_train_vs_eval():
    x = _x()
    gamma, beta = _params(3)
    layer = SecondMomentNorm(momentum=0.9, epsilon=1e-3)
    v = layer.init(KEY, x, use_running_average=False)
    # never updated during init, even in training mode
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["rms"]), 1.0)
    v = {"params": {"scale": gamma, "bias": beta}, "batch_stats": v["batch_stats"]}

    y_train, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    mbar = np.sqrt(np.mean(np.asarray(x, np.float64) ** 2, axis=(0, 1, 2)))
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["rms"]), 0.9 + 0.1 * mbar, rtol=1e-6)

    # training mode without a mutable collection: same output, nothing to update, no error
    y_train2 = layer.apply(v, x, use_running_average=False)
    np.testing.assert_array_equal(np.asarray(y_train), np.asarray(y_train2))

    # eval mode uses the running statistic and never changes it
    v2 = {**v, "batch_stats": upd["batch_stats"]}
    y_eval, upd2 = layer.apply(v2, x, use_running_average=True, mutable=["batch_stats"])
    r = np.asarray(upd["batch_stats"]["rms"], np.float64)
    ref = np.asarray(gamma) * np.asarray(x) / (r + 1e-3) + np.asarray(beta)
    np.testing.assert_allclose(np.asarray(y_eval), ref, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(upd2["batch_stats"]["rms"]), r.astype(np.float32))

    # field form of the flag, as in nn.BatchNorm
    y_eval_field = SecondMomentNorm(use_running_average=True, epsilon=1e-3).apply(v2, x)
    np.testing.assert_array_equal(np.asarray(y_eval_field), np.asarray(y_eval))


def test_l1_running_stat():
    x = _x()
    layer = SecondMomentNorm(variant="l1")
    v = layer.init(KEY, x, use_running_average=False)
    _, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    mabs = np.mean(np.abs(np.asarray(x, np.float64)), axis=(0, 1, 2))
    np.testing.assert_allclose(
        np.asarray(upd["batch_stats"]["mean_abs"]), 0.9 + 0.1 * mabs, rtol=1e-6
    )


def test_smn_axis_name_matches_global_batch():
    # statistics pmean'ed over a named axis equal the statistics of the whole batch
    x = _x()
    layer = SecondMomentNorm(axis_name="data")
    v = layer.init(KEY, x, use_running_average=False)
    y_full, upd_full = SecondMomentNorm().apply(
        v, x, use_running_average=False, mutable=["batch_stats"]
    )
    xs = x.reshape(2, 2, *x.shape[1:])
    y_split, upd_split = jax.vmap(
        lambda xi: layer.apply(v, xi, use_running_average=False, mutable=["batch_stats"]),
        axis_name="data",
    )(xs)
    np.testing.assert_allclose(np.asarray(y_split.reshape(x.shape)), np.asarray(y_full), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(upd_split["batch_stats"]["rms"][0]),
        np.asarray(upd_full["batch_stats"]["rms"]),
        rtol=1e-6,
    )


@pytest.mark.slow
def test_smn_sharded_across_devices():
    # Data-parallel over 4 host devices with shard_map + axis_name equals one device.
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, PartitionSpec as P
        from gne_jax.nn.normalization import SecondMomentNorm
        assert jax.device_count() == 4
        x = jax.random.normal(jax.random.key(0), (8, 3, 3, 4)) + 0.5
        layer = SecondMomentNorm(axis_name="data")
        v = layer.init(jax.random.key(1), x, use_running_average=False)
        ref = SecondMomentNorm().apply(v, x, use_running_average=False)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        f = jax.shard_map(lambda xi: layer.apply(v, xi, use_running_average=False),
                          mesh=mesh, in_specs=P("data"), out_specs=P("data"))
        np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), np.asarray(ref), rtol=1e-5)
        print("OK")
        """
    )
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------------- SMN Jacobian (derivations §8)


def test_smn_jacobian_spectrum_matches_theory():
    # One channel, M values: JJᵀ has M−1 eigenvalues γ²/(m̄+ε)² and one γ²ε²/(m̄+ε)⁴
    # (derivations §8, SMN row); exact Jacobian by jacfwd, eigenvalues by eigvalsh.
    with jax.enable_x64(True):
        M, gamma, eps = 12, 1.3, 0.05
        x = jnp.asarray(_x((M, 1), seed=3), jnp.float64)
        layer = SecondMomentNorm(epsilon=eps)
        v = {
            "params": {"scale": jnp.array([gamma]), "bias": jnp.array([0.4])},
            "batch_stats": {"rms": jnp.ones((1,))},
        }

        def f(x):
            return layer.apply(v, x, use_running_average=False)

        J = jax.jacfwd(f)(x).reshape(M, M)
        eig = np.sort(np.linalg.eigvalsh(np.asarray(J @ J.T)))
        mbar = float(jnp.sqrt(jnp.mean(x**2)))
        big = gamma**2 / (mbar + eps) ** 2
        small = big * (eps / (mbar + eps)) ** 2
        np.testing.assert_allclose(eig, np.sort([small] + [big] * (M - 1)), rtol=1e-10)


def test_smn_jacobian_moments_multichannel_against_theory_component():
    # Batch-coupled moments of a multi-channel SMN (block-diagonal over channels) from
    # the project's exact estimator, against the mean of theory.smn_train per channel.
    from gne_jax.probes.moments import jacobian_moments
    from gne_jax.theory.components import smn_train

    with jax.enable_x64(True):
        x = jnp.asarray(_x(X64, seed=4), jnp.float64)  # M = 12 per channel
        gamma = jnp.array([0.8, 1.0, 1.5], jnp.float64)
        eps = 0.02
        layer = SecondMomentNorm(epsilon=eps)
        v = {"params": {"scale": gamma, "bias": jnp.zeros(3)}, "batch_stats": {"rms": jnp.ones(3)}}
        est = jacobian_moments(
            lambda x: layer.apply(v, x, use_running_average=False), x, method="exact"
        )
        q = np.mean(np.asarray(x) ** 2, axis=(0, 1, 2))
        per = [
            smn_train(12, gamma=float(g), eps=eps).moments(float(qc))
            for g, qc in zip(gamma, q, strict=True)
        ]
        phi = np.mean([float(m.phi) for m in per])
        phi2 = np.mean([float(m.phi2) for m in per])
        assert float(est.phi) == pytest.approx(phi, rel=1e-9)
        assert float(est.phi2) == pytest.approx(phi2, rel=1e-9)


def test_smn_eval_jacobian_is_diagonal():
    x = _x((4, 3))
    layer = SecondMomentNorm(epsilon=1e-3)
    v = {
        "params": {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.zeros(3)},
        "batch_stats": {"rms": jnp.array([0.5, 1.0, 2.0])},
    }
    J = jax.jacfwd(lambda x: layer.apply(v, x, use_running_average=True))(x).reshape(12, 12)
    diag = np.tile(np.array([1.0, 2.0, 0.5]) / (np.array([0.5, 1.0, 2.0]) + 1e-3), 4)
    np.testing.assert_allclose(np.asarray(J), np.diag(diag), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- mean-only and Meterez BN


def test_mean_only_batch_norm():
    x = _x()
    layer = MeanOnlyBatchNorm()
    v = layer.init(KEY, x, use_running_average=False)
    assert set(v["params"]) == {"bias"}
    v = {"params": {"bias": jnp.array([0.1, -0.2, 0.3])}, "batch_stats": v["batch_stats"]}
    y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    xn = np.asarray(x, np.float64)
    mean = xn.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(y), xn - mean + [0.1, -0.2, 0.3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(upd["batch_stats"]["mean"]), 0.1 * mean, rtol=1e-5)
    y_eval = layer.apply({**v, "batch_stats": upd["batch_stats"]}, x, use_running_average=True)
    np.testing.assert_allclose(np.asarray(y_eval), xn - 0.1 * mean + [0.1, -0.2, 0.3], rtol=1e-5)


@pytest.mark.parametrize("scale_factor", [1.0, "sqrt_n"])
def test_meterez_batch_norm(scale_factor):
    # BN(X) = diag(XXᵀ)^(−1/2) X with X = features × samples (derivations §14.2)
    n, d = 8, 5
    x = _x((n, d))
    layer = MeterezBatchNorm(scale_factor=scale_factor, epsilon=0.0)
    v = layer.init(KEY, x, use_running_average=False)
    y = np.asarray(layer.apply(v, x, use_running_average=False), np.float64)
    X = np.asarray(x, np.float64).T
    ref = (np.diag(np.diag(X @ X.T) ** -0.5) @ X).T
    c = 1.0 if scale_factor == 1.0 else math.sqrt(n)
    np.testing.assert_allclose(y, c * ref, rtol=1e-5)
    # rows of BN(X) have norm c: no mean subtraction, no 1/n
    np.testing.assert_allclose(np.linalg.norm(y, axis=0), c, rtol=1e-5)


def test_meterez_eval_uses_running_rms():
    x = _x((8, 5))
    layer = MeterezBatchNorm(scale_factor="sqrt_n", epsilon=0.0, momentum=0.0)
    v = layer.init(KEY, x, use_running_average=False)
    y_train, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    # momentum 0: running RMS = batch RMS, so eval reproduces the training output
    y_eval = layer.apply(upd, x, use_running_average=True)
    np.testing.assert_allclose(np.asarray(y_eval), np.asarray(y_train), rtol=1e-5)


# ---------------------------------------------------------------- kernel reparametrizations


XC = (2, 5, 5, 3)  # input shape of every conv test


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.mark.parametrize("unbiased", [False, True])
def test_scaled_ws_conv_rows(unbiased):
    # conv tests share one input/kernel shape so eager compilations are reused
    x = _x(XC)
    layer = ScaledWSConv(4, (3, 3), padding="SAME", use_bias=False, unbiased_std=unbiased)
    v = layer.init(KEY, x)
    V = np.asarray(v["params"]["kernel"], np.float64)
    n = 3 * 3 * 3
    # the effective kernel: recomputed independently in numpy
    Vf = V.reshape(n, 4)
    W = math.sqrt(2.0 / n) * (Vf - Vf.mean(0)) / Vf.std(0, ddof=1 if unbiased else 0)
    np.testing.assert_allclose(np.sum(W**2, 0), 2.0 * ((n - 1) / n if unbiased else 1.0), rtol=1e-6)
    np.testing.assert_allclose(W.mean(0), 0.0, atol=1e-9)
    y = layer.apply(v, x)
    ref = _conv(x, jnp.asarray(W.reshape(V.shape), jnp.float32))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-5)
    # the norm is fixed for any V, not only at init (scale V and shift it)
    v2 = {"params": {"kernel": v["params"]["kernel"] * 7.0 + 3.0}}
    np.testing.assert_allclose(np.asarray(layer.apply(v2, x)), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_scaled_ws_dense_and_gain():
    x = _x((5, 16))
    layer = ScaledWSDense(6, gain=1.0)
    v = layer.init(KEY, x)
    W = np.asarray(standardize_kernel(v["params"]["kernel"], 1.0), np.float64)
    np.testing.assert_allclose(np.sum(W**2, 0), 1.0, rtol=1e-5)
    ref = np.asarray(x) @ W + np.asarray(v["params"]["bias"])
    np.testing.assert_allclose(np.asarray(layer.apply(v, x)), ref, rtol=1e-4, atol=1e-5)


def test_scaled_ws_gradient_reaches_kernel():
    x = _x((5, 16))
    layer = ScaledWSDense(4)
    v = layer.init(KEY, x)
    g = jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply({"params": p}, x))))(v["params"])
    assert np.all(np.isfinite(np.asarray(g["kernel"]))) and float(jnp.abs(g["kernel"]).max()) > 0
    # the standardization is invariant to V -> aV + b per filter: gradient ⟂ V and ⟂ 1
    flat_g = np.asarray(g["kernel"]).reshape(-1, 4)
    flat_v = np.asarray(v["params"]["kernel"]).reshape(-1, 4)
    np.testing.assert_allclose(flat_g.sum(0), 0.0, atol=1e-4)
    np.testing.assert_allclose((flat_g * (flat_v - flat_v.mean(0))).sum(0), 0.0, atol=1e-4)


def test_centered_conv():
    x = _x(XC)
    layer = CenteredConv(4, (3, 3), padding="SAME")
    v = layer.init(KEY, x)
    V = np.asarray(v["params"]["kernel"])
    Wc = V - V.reshape(-1, 4).mean(0)
    ref = _conv(x, jnp.asarray(Wc)) + v["params"]["bias"]
    np.testing.assert_allclose(np.asarray(layer.apply(v, x)), np.asarray(ref), rtol=1e-4, atol=1e-5)
    # zero-mean filters: a constant input gives the bias in the interior
    y_const = layer.apply(v, jnp.ones(XC))
    np.testing.assert_allclose(
        np.asarray(y_const[0, 1:4, 1:4]),
        np.broadcast_to(np.asarray(v["params"]["bias"]), (3, 3, 4)),
        atol=1e-5,
    )


def test_centered_dense():
    x = _x((5, 16))
    layer = CenteredDense(4)
    v = layer.init(KEY, x)
    V = np.asarray(v["params"]["kernel"], np.float64)
    ref = np.asarray(x) @ (V - V.mean(0)) + np.asarray(v["params"]["bias"])
    np.testing.assert_allclose(np.asarray(layer.apply(v, x)), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gain", [1.0, math.sqrt(2.0)])
def test_weight_norm_layers_keep_intended_scale(gain):
    x = _x((3, 10))
    layer = WeightNormDense(7, gain=gain)
    v = layer.init(KEY, x)
    np.testing.assert_allclose(np.asarray(v["params"]["scale"]), gain)
    V = np.asarray(v["params"]["kernel"], np.float64)
    W = gain * V / np.linalg.norm(V, axis=0)
    ref = np.asarray(x) @ W + np.asarray(v["params"]["bias"])
    np.testing.assert_allclose(np.asarray(layer.apply(v, x)), ref, rtol=1e-4, atol=1e-5)
    # rows of the effective kernel have squared norm gain² (= Kaiming's expectation)
    np.testing.assert_allclose(np.sum(W**2, 0), gain**2, rtol=1e-6)

    xc = _x(XC)
    conv = WeightNormConv(4, (3, 3), gain=gain, use_bias=False)
    vc = conv.init(KEY, xc)
    Vc = np.asarray(vc["params"]["kernel"], np.float64)
    Wc = gain * Vc / np.linalg.norm(Vc.reshape(-1, 4), axis=0)
    ref = _conv(xc, jnp.asarray(Wc, jnp.float32))
    np.testing.assert_allclose(
        np.asarray(conv.apply(vc, xc)), np.asarray(ref), rtol=1e-4, atol=1e-5
    )


def test_weight_norm_helper_matches_layer():
    x = _x((3, 10))
    wrapped = weight_norm(nn.Dense(7), gain=math.sqrt(2.0))
    v = wrapped.init(KEY, x)
    scales = jax.tree.leaves(v["params"])
    assert any(np.allclose(np.asarray(s), math.sqrt(2.0)) for s in scales if s.shape == (7,))
    inner = v["params"]["layer_instance"]
    V = np.asarray(inner["kernel"], np.float64)
    W = math.sqrt(2.0) * V / np.linalg.norm(V, axis=0)
    ref = np.asarray(x) @ W + np.asarray(inner["bias"])
    np.testing.assert_allclose(np.asarray(wrapped.apply(v, x)), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_bad_configuration_errors():
    x = _x()
    with pytest.raises(ValueError, match="valid: .*l2.*l1"):
        SecondMomentNorm(variant="l3").init(KEY, x, use_running_average=False)
    for layer in (SecondMomentNorm, MeanOnlyBatchNorm, MeterezBatchNorm):
        with pytest.raises(ValueError, match=f"{layer.__name__}: momentum must be in"):
            layer(momentum=1.5).init(KEY, x, use_running_average=False)
    with pytest.raises(ValueError, match="scale_factor"):
        MeterezBatchNorm(scale_factor="sqrt").init(KEY, x, use_running_average=False)
    with pytest.raises(ValueError, match="batch axis and a feature axis"):
        SecondMomentNorm().init(KEY, jnp.ones(4), use_running_average=False)
    with pytest.raises(ValueError, match="out of range"):
        SecondMomentNorm(axis=5).init(KEY, x, use_running_average=False)
