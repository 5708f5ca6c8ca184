"""Initializers and the gain table against exact properties and sampling error."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gne_jax.nn.initializers import (
    GAIN_NAMES,
    INITIALIZERS,
    activation_gain,
    delta_orthogonal,
    fans,
    get_initializer,
    orthogonal,
)

KEY = jax.random.key(0)


# ---------------------------------------------------------------- gain table


@pytest.mark.parametrize(
    "name,slope,expected",
    [
        ("linear", None, 1.0),
        ("tanh", None, 1.0),
        ("relu", None, math.sqrt(2.0)),
        ("prelu", None, math.sqrt(2.0)),
        ("sprelu", None, math.sqrt(2.0)),
        ("selu", None, 1.0),
        # derivations §9 quotes these to 4 decimals
        ("leaky_relu", 0.18, 1.3918),
        ("leaky_relu", 0.3, 1.3546),
        ("leaky_relu", 0.5, 1.2649),
    ],
)
def test_gain_table(name, slope, expected):
    assert activation_gain(name, negative_slope=slope) == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize("a", [0.0, 0.18, 0.3, 0.5, 1.0])
def test_leaky_gain_gives_unit_phi(a):
    # gain² · φ_act = 1 with φ_leaky = (1 + a²)/2 at p = ½ (derivations §8)
    assert activation_gain("leaky_relu", a) ** 2 * (1 + a * a) / 2 == pytest.approx(1.0)


def test_gain_errors():
    with pytest.raises(ValueError, match="valid: .*relu.*leaky_relu"):
        activation_gain("swish")
    with pytest.raises(ValueError, match="negative_slope"):
        activation_gain("leaky_relu")
    assert set(GAIN_NAMES) >= {"linear", "tanh", "relu", "leaky_relu", "prelu", "sprelu"}


# ---------------------------------------------------------------- orthogonality

ORTHO_SHAPES = [(64, 64), (100, 30), (30, 100), (3, 3, 16, 32), (3, 3, 64, 16)]
# One large shape shared by the variance tests (eager compilations are per shape).
BIG = (3, 3, 64, 96)


@pytest.mark.parametrize("shape", ORTHO_SHAPES)
@pytest.mark.parametrize("gain", [1.0, math.sqrt(2.0)])
def test_orthogonal_is_orthogonal(shape, gain):
    w = orthogonal(gain)(KEY, shape)
    assert w.shape == shape and w.dtype == jnp.float32
    m = np.asarray(w, np.float64).reshape(-1, shape[-1]) / gain  # (fan_in, fan_out)
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    np.testing.assert_allclose(gram, np.eye(gram.shape[0]), atol=1e-5)


def test_orthogonal_is_haar_not_biased():
    # Without the sign correction QR returns a biased diagonal (theory of Mezzadri
    # 2007); under Haar each entry has mean 0 and variance 1/n.
    n, reps = 4, 4000
    keys = jax.random.split(KEY, reps)
    qs = jax.vmap(lambda k: orthogonal()(k, (n, n)))(keys)
    diag = np.asarray(jnp.diagonal(qs, axis1=1, axis2=2))  # (reps, n)
    se = math.sqrt(1.0 / n / reps)
    assert np.all(np.abs(diag.mean(0)) < 4 * se)
    np.testing.assert_allclose((diag**2).mean(0), 1.0 / n, atol=4 * math.sqrt(2.0 / reps) / n)


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (3, 3, 8, 32), (3, 3, 32, 8), (5, 5, 4, 6)])
def test_delta_orthogonal(shape):
    gain = 1.7
    w = np.asarray(delta_orthogonal(gain)(KEY, shape), np.float64)
    kh, kw, c_in, c_out = shape
    centre = w[kh // 2, kw // 2] / gain
    gram = centre.T @ centre if c_in >= c_out else centre @ centre.T
    np.testing.assert_allclose(gram, np.eye(min(c_in, c_out)), atol=1e-5)
    w[kh // 2, kw // 2] = 0.0
    assert np.all(w == 0.0)


def test_delta_orthogonal_conv_is_isometry():
    # A conv with a delta-orthogonal kernel and c_out >= c_in is an exact isometry
    # (times gain) on every spatial position, also with SAME padding at the borders.
    gain, shape = 1.3, (3, 3, 8, 16)
    w = delta_orthogonal(gain)(KEY, shape)
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(
        jnp.linalg.norm(y, axis=-1), gain * jnp.linalg.norm(x, axis=-1), rtol=1e-5
    )


def test_delta_orthogonal_reference_scaling():
    shape = (3, 3, 8, 32)
    plain = delta_orthogonal(1.0)(KEY, shape)
    scaled = delta_orthogonal(1.0, scale_by_fan_ratio=True)(KEY, shape)
    np.testing.assert_allclose(scaled, plain * math.sqrt(32 / 8), rtol=1e-6)


def test_delta_orthogonal_rejects_dense_kernel():
    with pytest.raises(ValueError, match="conv kernel"):
        delta_orthogonal()(KEY, (16, 16))


# ---------------------------------------------------------------- variances

# (name, default gain, fan used by the default mode, distribution)
VARIANCE_CASES = [
    ("kaiming_normal", math.sqrt(2.0), "fan_in", "normal"),
    ("kaiming_uniform", math.sqrt(2.0), "fan_in", "uniform"),
    ("xavier_normal", 1.0, "fan_avg", "normal"),
    ("xavier_uniform", 1.0, "fan_avg", "uniform"),
]


@pytest.mark.parametrize("name,gain,mode,dist", VARIANCE_CASES)
def test_measured_variance_matches(name, gain, mode, dist):
    shape = BIG
    w = np.asarray(get_initializer(name)(KEY, shape), np.float64).ravel()
    fan_in, fan_out = fans(shape)
    fan = {"fan_in": fan_in, "fan_avg": (fan_in + fan_out) / 2}[mode]
    var = gain**2 / fan
    n = w.size
    # Var of the sample second moment: (E x⁴ − σ⁴)/n, E x⁴ = 3σ⁴ (normal), 9σ⁴/5 (uniform)
    kurt = 3.0 if dist == "normal" else 1.8
    se_var = var * math.sqrt((kurt - 1.0) / n)
    assert abs(np.mean(w**2) - var) < 4 * se_var
    assert abs(np.mean(w)) < 4 * math.sqrt(var / n)
    if dist == "uniform":
        assert np.max(np.abs(w)) <= math.sqrt(3 * var) * (1 + 1e-6)


@pytest.mark.parametrize("gain", [0.5, 2.0])
def test_gain_and_mode_arguments(gain):
    w = np.asarray(get_initializer("kaiming_normal", gain=gain, mode="fan_out")(KEY, BIG))
    var = gain**2 / fans(BIG)[1]
    assert abs(np.mean(w**2) - var) < 4 * var * math.sqrt(2.0 / w.size)


@pytest.mark.parametrize("shape", [(100, 30), (30, 100), (3, 3, 16, 32)])
def test_orthogonal_second_moment_exact(shape):
    # Σ w² = gain² · min(fan_in, fan_out) exactly (an orthonormal frame).
    gain = 1.5
    w = np.asarray(get_initializer("orthogonal", gain=gain)(KEY, shape), np.float64)
    fan_in, fan_out = math.prod(shape[:-1]), shape[-1]
    assert np.sum(w**2) == pytest.approx(gain**2 * min(fan_in, fan_out), rel=1e-5)


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("name", INITIALIZERS)
def test_registry_deterministic_and_dtype(name):
    init = get_initializer(name)
    a = init(KEY, BIG, jnp.float32)
    b = init(KEY, BIG, jnp.float32)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == jnp.float32


def test_float64():
    with jax.enable_x64(True):
        w = get_initializer("orthogonal")(KEY, (30, 100), jnp.float64)
        assert w.dtype == jnp.float64
        # float64 QR is orthogonal to float64 precision
        np.testing.assert_allclose(np.asarray(w @ w.T), np.eye(30), atol=1e-12)


def test_registry_errors():
    with pytest.raises(ValueError, match="valid: .*kaiming_normal.*delta_orthogonal"):
        get_initializer("he_normal")
    with pytest.raises(ValueError, match="mode"):
        get_initializer("kaiming_normal", mode="fan_sideways")
    with pytest.raises(ValueError, match="gain"):
        get_initializer("orthogonal", gain=-1.0)
    with pytest.raises(ValueError, match="at least 2 axes"):
        get_initializer("kaiming_normal")(KEY, (7,))
    with pytest.raises(ValueError, match="Bad arguments"):
        get_initializer("orthogonal", mode="fan_in")
    for name, shape in (("orthogonal", (3, 3)), ("delta_orthogonal", (3, 3, 2, 2)),
                        ("kaiming_normal", (3, 3))):
        with pytest.raises(TypeError, match=f"{name}: dtype must be a floating type"):
            get_initializer(name)(KEY, shape, jnp.int32)
