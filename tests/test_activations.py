"""Activations against their formulas; the SELU solver against derivations §11.2."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from gne_jax.nn.activations import (
    ACTIVATIONS,
    SELU_ALPHA,
    SELU_LAMBDA,
    Activation,
    get_activation,
    is_learned,
    selu_coefficients,
    selu_derivative_moment,
    shaped_activation,
    shaped_gain,
)

X = jnp.linspace(-3.0, 3.0, 13)

# derivations §11.2, q = 1: (gamma0, epsilon, lambda, alpha)
SELU_TABLE = [
    (1, 0.07157, 1.0507, 1.6732),
    (1, 0.0716, 1.0506, 1.6738),
    (1, 0.065, 1.0892, 1.5382),
    (1, 0.06, 1.1175, 1.4404),
    (1, 0.03, 1.2745, 0.8930),
    (1, 0.01, 1.3692, 0.4799),
    (2, 0.03, 0.9441, 0.7803),
    (2, 0.0716, 0.8607, 1.3222),
]


@pytest.mark.parametrize("gamma0,eps,lam,alpha", SELU_TABLE)
def test_selu_solver_reproduces_table(gamma0, eps, lam, alpha):
    got_lam, got_alpha = selu_coefficients(eps, gamma0=gamma0, q=1.0)
    # the table is rounded to 4 decimals
    assert got_lam == pytest.approx(lam, abs=1e-4)
    assert got_alpha == pytest.approx(alpha, abs=1e-4)


@pytest.mark.parametrize("gamma0,eps,q", [(1.0, 0.0716, 1.0), (2.0, 0.03, 1.0), (1.0, 0.05, 0.5)])
def test_selu_solution_satisfies_equations_by_quadrature(gamma0, eps, q):
    # independent of the closed forms: integrate selu'(x)² and selu(x)² numerically
    lam, alpha = selu_coefficients(eps, gamma0=gamma0, q=q)
    v = q * gamma0
    pdf = stats.norm(0, math.sqrt(v)).pdf

    def selu(x):
        return lam * x if x > 0 else lam * alpha * math.expm1(x)

    def dselu(x):
        return lam if x > 0 else lam * alpha * math.exp(x)

    def expect(f):
        return sum(integrate.quad(lambda x: f(x) * pdf(x), a, b)[0] for a, b in [(-40, 0), (0, 40)])

    assert gamma0 * expect(lambda x: dselu(x) ** 2) == pytest.approx(1 + eps, abs=1e-8)
    assert expect(lambda x: selu(x) ** 2) == pytest.approx(q, abs=1e-8)


def test_original_selu_phi():
    # derivations §11.2: φ of the original SELU at v = 1 is 1.07157
    assert selu_derivative_moment(SELU_LAMBDA, SELU_ALPHA, 1.0) == pytest.approx(1.07157, abs=1e-5)


def test_selu_solver_errors():
    with pytest.raises(ValueError, match="no positive solution"):
        selu_coefficients(0.9)
    with pytest.raises(ValueError, match="epsilon"):
        selu_coefficients(-2.0)
    with pytest.raises(ValueError, match="gamma0"):
        selu_coefficients(0.03, gamma0=0.0)
    with pytest.raises(ValueError, match="q must"):
        selu_coefficients(0.03, q=-1.0)


# ---------------------------------------------------------------- fixed activations


def _np(x):
    return np.asarray(x, np.float64)


@pytest.mark.parametrize(
    "name,params,ref",
    [
        ("linear", {}, lambda x: x),
        ("relu", {}, lambda x: np.maximum(x, 0)),
        ("leaky_relu", {"negative_slope": 0.3}, lambda x: np.where(x > 0, x, 0.3 * x)),
        ("tanh", {}, np.tanh),
        ("sigmoid", {}, lambda x: 1 / (1 + np.exp(-x))),
        (
            "selu",
            {},
            lambda x: SELU_LAMBDA * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0))),
        ),
    ],
)
def test_fixed_activation_formulas(name, params, ref):
    f = get_activation(name, **params)
    assert not is_learned(name)
    np.testing.assert_allclose(_np(f(X)), ref(_np(X)), rtol=1e-5, atol=1e-6)


def test_selu_depth_aware_formula():
    lam, alpha = selu_coefficients(0.03)
    f = get_activation("selu_depth_aware", epsilon=0.03)
    x = _np(X)
    ref = np.where(x > 0, lam * x, lam * alpha * np.expm1(np.minimum(x, 0)))
    np.testing.assert_allclose(_np(f(X)), ref, rtol=1e-5, atol=1e-6)
    # finite gradient at 0 from both sides (no NaN from expm1 of large x)
    g = jax.vmap(jax.grad(f))(jnp.array([-1e-3, 0.0, 1e-3, 50.0]))
    assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------- shaped


def test_shaped_activation_gain():
    p = 0.4
    for ell in (1, 2, 32):
        f = get_activation("shaped_tanh", layer_index=ell, exponent=p)
        np.testing.assert_allclose(_np(f(X)), np.tanh(ell ** (-p) * _np(X)), rtol=1e-5, atol=1e-7)
    f = shaped_activation("sin", 5, p)
    np.testing.assert_allclose(_np(f(X)), np.sin(5 ** (-p) * _np(X)), rtol=1e-5, atol=1e-7)


def test_shaped_activation_traced_layer_index():
    # usable inside lax.scan over layers with the index as a traced value
    def body(h, ell):
        return shaped_activation("tanh", ell, 0.4)(h), None

    out, _ = jax.lax.scan(body, X, jnp.arange(1, 5))
    ref = _np(X)
    for ell in range(1, 5):
        ref = np.tanh(ell ** (-0.4) * ref)
    np.testing.assert_allclose(_np(out), ref, rtol=1e-5, atol=1e-6)


def test_shaped_errors():
    with pytest.raises(ValueError, match="layer_index"):
        shaped_gain(0, 0.4)
    with pytest.raises(ValueError, match="valid: .*tanh.*sin"):
        shaped_activation("relu", 1, 0.4)


# ---------------------------------------------------------------- learned


@pytest.mark.parametrize("name", ["prelu", "sprelu"])
def test_learned_activation(name):
    assert is_learned(name)
    x = jax.random.normal(jax.random.key(0), (8, 5))
    module = get_activation(name)()
    variables = module.init(jax.random.key(1), x)
    a = variables["params"]["negative_slope"]
    assert a.shape == () and float(a) == 0.25
    y = _np(module.apply(variables, x))
    ref = np.where(_np(x) >= 0, _np(x), 0.25 * _np(x))
    if name == "sprelu":
        ref = ref / math.sqrt(1 + 0.25**2)
    np.testing.assert_allclose(y, ref, rtol=1e-6)

    # gradient w.r.t. the slope, against central finite differences in float64
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)

        def loss(a):
            return jnp.sum(jnp.sin(module.apply({"params": {"negative_slope": a}}, x64)))

        a0, h = 0.3, 1e-6
        fd = (loss(a0 + h) - loss(a0 - h)) / (2 * h)
        assert float(jax.grad(loss)(a0)) == pytest.approx(float(fd), rel=1e-6)


@pytest.mark.parametrize("a", [0.0, 0.25, 0.7])
def test_sprelu_phi_is_half(a):
    # φ(JJᵀ) = mean f'(x)² = ½ for any slope when half the inputs are positive (derivations §8)
    module = get_activation("sprelu", slope_init=a)()
    x = jnp.array([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0])
    variables = module.init(jax.random.key(0), x)
    fprime = jax.vmap(jax.grad(lambda s: module.apply(variables, s)))(x)
    assert float(jnp.mean(fprime**2)) == pytest.approx(0.5, rel=1e-6)


def test_per_channel_prelu():
    module = get_activation("prelu", per_channel=True)()
    variables = module.init(jax.random.key(0), jnp.ones((2, 7)))
    assert variables["params"]["negative_slope"].shape == (7,)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_module_covers_all(name):
    params = {
        "leaky_relu": {"negative_slope": 0.3},
        "selu_depth_aware": {"epsilon": 0.03},
        "shaped_tanh": {"layer_index": 2, "exponent": 0.4},
        "shaped_sin": {"layer_index": 2, "exponent": 0.4},
    }.get(name, {})
    module = Activation(name, params)
    variables = module.init(jax.random.key(0), X)
    y = module.apply(variables, X)
    f = get_activation(name, **params)
    ref = f().apply({"params": variables["params"][name]}, X) if is_learned(name) else f(X)
    np.testing.assert_allclose(_np(y), _np(ref), rtol=1e-6)
    assert bool(variables) == is_learned(name)


def test_bad_names_and_params():
    with pytest.raises(ValueError, match="valid: .*relu.*sprelu.*shaped_sin"):
        get_activation("gelu")
    with pytest.raises(ValueError, match="valid"):
        is_learned("gelu")
    with pytest.raises(ValueError, match="needs parameter.*negative_slope"):
        get_activation("leaky_relu")
    with pytest.raises(ValueError, match="unexpected parameter.*alpha.*accepted"):
        get_activation("relu", alpha=1.0)
    with pytest.raises(ValueError, match="needs parameter.*epsilon"):
        get_activation("selu_depth_aware")
