"""The component library of theory.md §8: φ(JJᵀ) and ϕ(JJᵀ) of single layers.

Every component is a `Component`: a pure function of the input second moment q
(``moments(q) -> Moments`` and ``forward(q) -> q_out``, the q-map) plus the
size ratio m/n of its output to its input, which the serial theorem needs
(theory §3). Values are normalized by the output dimension m (theory §1.2).
Activations assume a zero-mean Gaussian input N(0, q) (p = ½ for ReLU-like
activations unless given); linear components use the second-moment lemma
(theory §6): for an isotropic input, ``q_out = φ · q_in``.

All formulas are written with ``jax.numpy`` so they work under ``jit``/``vmap``
and in float64 when ``jax_enable_x64`` is on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

Array = jax.Array

__all__ = [
    "Moments",
    "Component",
    "gaussian_expectation",
    "dense_gaussian",
    "conv_gaussian",
    "orthogonal",
    "conv_orthogonal_flat",
    "delta_orthogonal",
    "relu",
    "leaky_relu",
    "prelu",
    "sprelu",
    "tanh",
    "sigmoid",
    "selu",
    "selu_moments",
    "smooth_activation",
    "batchnorm_train",
    "batchnorm_eval",
    "smn_train",
    "smn_eval",
    "sws_conv",
    "dropout",
    "avg_pool",
    "global_avg_pool",
    "identity",
    "scale",
    "tanh_moments",
    "sigmoid_moments",
]


class Moments(NamedTuple):
    """φ(JJᵀ) (mean eigenvalue) and ϕ(JJᵀ) (eigenvalue variance) of one Jacobian."""

    phi: Array
    varphi: Array

    @property
    def phi2(self) -> Array:
        """φ((JJᵀ)²) = ϕ + φ²."""
        return self.varphi + self.phi**2

    @property
    def normalized_variance(self) -> Array:
        """ϕ/φ², the quantity that adds along a chain (theory §3)."""
        return self.varphi / self.phi**2


class Component(NamedTuple):
    """A layer of the component library.

    Attributes:
      name: a short label for tables.
      moments: ``q_in -> Moments`` (q_in is the input second moment per entry).
      forward: ``q_in -> q_out``, the second-moment (q-)map.
      size_ratio: m/n, output size over input size (1 for shape-preserving layers).
    """

    name: str
    moments: Callable[[Array], Moments]
    forward: Callable[[Array], Array]
    size_ratio: float = 1.0


def _f(x) -> Array:
    """A float scalar in the default float dtype (float64 under x64)."""
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    v = np.asarray(value)
    bad = np.any(v < 0) if allow_zero else np.any(v <= 0)
    if bad or not np.all(np.isfinite(v)):
        rel = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {rel}, got {value!r}")


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------
# Gaussian expectations by Gauss–Hermite quadrature
# ---------------------------------------------------------------------------

_GH_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _gh(degree: int) -> tuple[np.ndarray, np.ndarray]:
    if degree not in _GH_CACHE:
        x, w = np.polynomial.hermite_e.hermegauss(degree)  # weight e^{-x²/2}
        _GH_CACHE[degree] = (x, w / math.sqrt(2.0 * math.pi))
    return _GH_CACHE[degree]


def gaussian_expectation(fn: Callable[[Array], Array], q, *, degree: int = 256,
                         method: str = "gauss_hermite") -> Array:
    """E[fn(h)] for h ~ N(0, q).

    ``method="gauss_hermite"`` (default): probabilists' Gauss–Hermite rule with
    ``degree`` nodes, exact for polynomials of degree < 2·degree and exponentially
    accurate for functions analytic in a strip; the rate falls as q grows (the
    poles of sech at ±iπ/2 move towards the real axis in units of √q): for tanh at
    degree 256 the error is ~1e-9 in φ and ~1e-7 in ϕ at q = 3.
    ``method="trapezoid"``: the trapezoid rule in z = h/√q on [−14, 14] with
    ``8·degree`` points, which converges like e^{−2π·d/step} for a pole at distance
    d; more accurate for large q. Kinks (ReLU, SELU at 0) converge slowly with either
    rule: use the closed forms.
    """
    _check_positive("q", q, allow_zero=True)
    dtype = jnp.result_type(float)
    if method == "gauss_hermite":
        x, w = _gh(int(degree))
        x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    elif method == "trapezoid":
        x = jnp.linspace(-14.0, 14.0, 8 * int(degree) + 1, dtype=dtype)
        w = jnp.exp(-(x**2) / 2) / math.sqrt(2 * math.pi) * (x[1] - x[0])
    else:
        raise ValueError(f"method must be 'gauss_hermite' or 'trapezoid', got {method!r}")
    return jnp.sum(w * fn(jnp.sqrt(_f(q)) * x))


# ---------------------------------------------------------------------------
# Linear layers
# ---------------------------------------------------------------------------


def _linear(name: str, phi: Array, varphi: Array, size_ratio: float) -> Component:
    m = Moments(_f(phi), _f(varphi))
    return Component(name, lambda q: m, lambda q: m.phi * _f(q), float(size_ratio))


def dense_gaussian(fan_in: int, fan_out: int, *, sigma2=None, gain=None) -> Component:
    """Dense W ∈ ℝ^{m×n}, i.i.d. N(0, σ²): φ = nσ², ϕ = n(m+1)σ⁴ (exact in expectation).

    Give the weight variance ``sigma2`` or a ``gain`` with σ² = gain²/fan_in
    (Kaiming-normal fan-in mode); default gain 1.
    """
    n, m = _check_int("fan_in", fan_in), _check_int("fan_out", fan_out)
    if sigma2 is not None and gain is not None:
        raise ValueError("give either sigma2 or gain, not both")
    if sigma2 is None:
        gain = 1.0 if gain is None else gain
        _check_positive("gain", gain)
        sigma2 = _f(gain) ** 2 / n
    _check_positive("sigma2", sigma2)
    s2 = _f(sigma2)
    return _linear(f"dense_gaussian({n}->{m})", n * s2, n * (m + 1) * s2**2, m / n)


def conv_gaussian(
    c_in: int, c_out: int, kernel_size=(3, 3), *, stride: int = 1, sigma2=None, gain=None
) -> Component:
    """Convolution with an i.i.d. N(0, σ²) kernel, large spatial extent.

    φ = c_in·k_h·k_w·σ², ϕ ≈ φ²·c_out/(c_in·stride²) (the output/input size ratio,
    as for a dense layer; theory §8 checks stride 1 only). σ² = gain²/fan_in if
    ``gain`` is given. Zero-padded borders lower φ slightly (not modelled).
    """
    c_in, c_out = _check_int("c_in", c_in), _check_int("c_out", c_out)
    kh, kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else kernel_size
    kh, kw, stride = _check_int("kernel_size", kh), _check_int("kernel_size", kw), _check_int(
        "stride", stride
    )
    fan_in = c_in * kh * kw
    if sigma2 is not None and gain is not None:
        raise ValueError("give either sigma2 or gain, not both")
    if sigma2 is None:
        gain = 1.0 if gain is None else gain
        _check_positive("gain", gain)
        sigma2 = _f(gain) ** 2 / fan_in
    _check_positive("sigma2", sigma2)
    phi = fan_in * _f(sigma2)
    ratio = c_out / (c_in * stride * stride)
    return _linear(f"conv_gaussian({c_in}->{c_out},k{kh}x{kw},s{stride})", phi, phi**2 * ratio,
                   ratio)


def orthogonal(fan_in: int, fan_out: int, *, gain=1.0) -> Component:
    """γ·O with O Haar-orthogonal: m ≤ n: φ = γ², ϕ = 0; m > n: φ = γ²n/m, ϕ = γ⁴(n/m)(1−n/m)."""
    n, m = _check_int("fan_in", fan_in), _check_int("fan_out", fan_out)
    _check_positive("gain", gain)
    g2 = _f(gain) ** 2
    if m <= n:
        phi, varphi = g2, 0.0 * g2
    else:
        r = n / m
        phi, varphi = g2 * r, g2**2 * r * (1 - r)
    return _linear(f"orthogonal({n}->{m})", phi, varphi, m / n)


def conv_orthogonal_flat(c_in: int, c_out: int, kernel_size=3, *, gain=1.0) -> Component:
    """Conv whose flattened kernel (c_out × c_in·k²) has orthonormal rows × gain.

    φ = gain² in the interior; ϕ > 0 in general (overlapping shifted filters) and is
    not given by theory.md: it is approximated here by 0 (use delta-orthogonal for ϕ = 0).
    """
    c_in, c_out = _check_int("c_in", c_in), _check_int("c_out", c_out)
    _check_positive("gain", gain)
    return _linear(f"conv_orthogonal_flat({c_in}->{c_out})", _f(gain) ** 2, _f(0.0), c_out / c_in)


def delta_orthogonal(c_in: int, c_out: int, *, gain=1.0, stride: int = 1,
                     scale_by_fan_ratio: bool = False) -> Component:
    """Delta-orthogonal conv: centre tap a c_out × c_in Haar block, other taps 0.

    With ``scale_by_fan_ratio`` (the reference code; same flag as
    `gne_jax.initializers.delta_orthogonal`) the block is multiplied by
    gain·√(c_out/c_in): c_out ≥ c_in: φ = gain², ϕ = gain⁴(c_out/c_in − 1);
    c_out < c_in: φ = gain²·c_out/c_in, ϕ = 0. Without it the multiplier is ``gain``
    and the moments are those of `orthogonal` (per spatial position).
    """
    c_in, c_out = _check_int("c_in", c_in), _check_int("c_out", c_out)
    stride = _check_int("stride", stride)
    mult = _f(gain) * (math.sqrt(c_out / c_in) if scale_by_fan_ratio else 1.0)
    comp = orthogonal(c_in, c_out, gain=mult)
    ratio = c_out / (c_in * stride * stride)
    return Component(f"delta_orthogonal({c_in}->{c_out})", comp.moments, comp.forward, ratio)


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def _diag_activation(name, phi_fn, varphi_fn, forward) -> Component:
    return Component(name, lambda q: Moments(phi_fn(q), varphi_fn(q)), forward, 1.0)


def leaky_relu(negative_slope=0.01, *, p=0.5) -> Component:
    """diag(1 or a): φ = p + a²(1−p), ϕ = p + a⁴(1−p) − φ²; q_out = q(1+a²)/2 at p = ½."""
    _check_positive("p", p)
    if not isinstance(p, jax.core.Tracer) and p > 1:
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    a, p = _f(negative_slope), _f(p)
    phi = p + a**2 * (1 - p)
    varphi = p + a**4 * (1 - p) - phi**2
    # E[f(h)²] for symmetric h: a fraction p on the positive side (p = ½ exactly).
    return _diag_activation(f"leaky_relu({float(negative_slope):g})", lambda q: phi,
                            lambda q: varphi, lambda q: _f(q) * (1 + a**2) / 2)


def relu(*, p=0.5) -> Component:
    """D = diag(1_{x>0}): φ = p, ϕ = p(1−p); q_out = q/2."""
    c = leaky_relu(0.0, p=p)
    return c._replace(name="relu")


def prelu(slope=0.25, *, p=0.5) -> Component:
    """PReLU at its current slope a (init 0.25: φ = 0.53125, ϕ = 0.2197): as leaky ReLU."""
    return leaky_relu(slope, p=p)._replace(name=f"prelu({float(slope):g})")


def sprelu(slope=0.25, *, p=0.5) -> Component:
    """sPReLU = PReLU_a(x)/√(1+a²): φ = ½, ϕ = ¼((1−a²)/(1+a²))² at p = ½."""
    base = leaky_relu(slope, p=p)
    s = 1.0 / (1.0 + _f(slope) ** 2)

    def moments(q):
        m = base.moments(q)
        return Moments(m.phi * s, m.varphi * s**2)

    return Component(f"sprelu({float(slope):g})", moments, lambda q: base.forward(q) * s, 1.0)


def _moments_from_derivative(dfn, q, degree, method="gauss_hermite") -> Moments:
    d2 = lambda h: dfn(h) ** 2
    phi = gaussian_expectation(d2, q, degree=degree, method=method)
    phi2 = gaussian_expectation(lambda h: d2(h) ** 2, q, degree=degree, method=method)
    return Moments(phi, phi2 - phi**2)


def _sech2(h):
    return 1.0 - jnp.tanh(h) ** 2


def tanh_moments(q, *, degree: int = 256, method: str = "gauss_hermite") -> Moments:
    """tanh with input N(0, q): φ = E[sech⁴h] ≈ 1 − 2q + 7q², ϕ = E[sech⁸h] − φ² ≈ 8q²."""
    return _moments_from_derivative(_sech2, q, degree, method)


def sigmoid_moments(q, *, degree: int = 256, method: str = "gauss_hermite") -> Moments:
    """sigmoid with input N(0, q): φ = φ_tanh(q/4)/16, ϕ = ϕ_tanh(q/4)/256 (s' = ¼ sech²(x/2))."""
    m = tanh_moments(_f(q) / 4, degree=degree, method=method)
    return Moments(m.phi / 16, m.varphi / 256)


def tanh(*, degree: int = 256) -> Component:
    """tanh activation; q_out = E[tanh²h], h ~ N(0, q) (Gauss–Hermite)."""
    return Component(
        "tanh",
        lambda q: tanh_moments(q, degree=degree),
        lambda q: gaussian_expectation(lambda h: jnp.tanh(h) ** 2, q, degree=degree),
        1.0,
    )


def sigmoid(*, degree: int = 256) -> Component:
    """Logistic sigmoid; q_out = E[s(h)²] (non-zero mean: this is a second moment)."""
    return Component(
        "sigmoid",
        lambda q: sigmoid_moments(q, degree=degree),
        lambda q: gaussian_expectation(lambda h: jax.nn.sigmoid(h) ** 2, q, degree=degree),
        1.0,
    )


def smooth_activation(fn: Callable[[Array], Array], name: str = "activation", *,
                      degree: int = 256) -> Component:
    """Any elementwise activation: φ = E[f'(h)²], ϕ = E[f'(h)⁴] − φ², q_out = E[f(h)²].

    f' is taken with ``jax.grad``; expectations by Gauss–Hermite quadrature, so
    accuracy is best for smooth f.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    dfn = jax.vmap(jax.grad(lambda x: jnp.sum(fn(x))))
    return Component(
        name,
        lambda q: _moments_from_derivative(dfn, q, degree),
        lambda q: gaussian_expectation(lambda h: fn(h) ** 2, q, degree=degree),
        1.0,
    )


def selu_moments(lam, alpha, v) -> Moments:
    """SELU(λ, α) with pre-activation N(0, v) (closed forms, theory §8 / §11).

    φ = λ²/2 + λ²α²e^{2v}Φ(−2√v),  ϕ = λ⁴/2 + λ⁴α⁴e^{8v}Φ(−4√v) − φ².
    """
    lam, alpha, v = _f(lam), _f(alpha), _f(v)
    sv = jnp.sqrt(v)
    # e^{kv}Φ(−c√v) computed in log space: the factors over/underflow separately.
    t2 = jnp.exp(2 * v + log_ndtr(-2 * sv))
    t8 = jnp.exp(8 * v + log_ndtr(-4 * sv))
    phi = lam**2 / 2 + lam**2 * alpha**2 * t2
    phi2 = lam**4 / 2 + lam**4 * alpha**4 * t8
    return Moments(phi, phi2 - phi**2)


def _selu_second_moment(lam, alpha, v) -> Array:
    """E[selu(h)²] = λ²[α²(e^{2v}Φ(−2√v) − 2e^{v/2}Φ(−√v) + ½) + v/2], h ~ N(0, v)."""
    lam, alpha, v = _f(lam), _f(alpha), _f(v)
    sv = jnp.sqrt(v)
    t2 = jnp.exp(2 * v + log_ndtr(-2 * sv))
    t1 = jnp.exp(v / 2 + log_ndtr(-sv))
    return lam**2 * (alpha**2 * (t2 - 2 * t1 + 0.5) + v / 2)


def selu(lam=1.0507009873554805, alpha=1.6732632423543772) -> Component:
    """SELU with given (λ, α); for the depth-aware coefficients use
    ``gne_jax.activations.selu_coefficients(epsilon, gamma0, q)`` (one solver in the library).
    """
    _check_positive("lam", lam)
    _check_positive("alpha", alpha, allow_zero=True)
    return Component(
        f"selu({float(lam):.4g},{float(alpha):.4g})",
        lambda q: selu_moments(lam, alpha, q),
        lambda q: _selu_second_moment(lam, alpha, q),
        1.0,
    )


# ---------------------------------------------------------------------------
# Normalization (training mode: batch-coupled Jacobian, theory §1.4)
# ---------------------------------------------------------------------------


def batchnorm_train(M: int, *, gamma=1.0, eps=0.0) -> Component:
    """Batch norm in training mode, one channel of M values sharing the statistics.

    JJᵀ has M−2 eigenvalues γ²/(σ²+ε), one γ²ε²/(σ²+ε)³ (along x̂) and one 0 (along 1),
    so for ε → 0: φ = γ²(1−2/M)/σ², ϕ = γ⁴·2(M−2)/(M²σ⁴). σ² is the input variance;
    the input is taken zero-mean so σ² = q_in. q_out = γ²σ²/(σ²+ε).
    """
    M = _check_int("M", M)
    if M < 3:
        raise ValueError(f"M must be >= 3 for batch norm, got {M}")
    _check_positive("eps", eps, allow_zero=True)
    g2, eps = _f(gamma) ** 2, _f(eps)

    def moments(q):
        s = _f(q) + eps
        big = g2 / s
        small = big * (eps / s) ** 2
        phi = ((M - 2) * big + small) / M
        phi2 = ((M - 2) * big**2 + small**2) / M
        return Moments(phi, phi2 - phi**2)

    return Component(f"batchnorm_train(M={M})", moments, lambda q: g2 * _f(q) / (_f(q) + eps), 1.0)


def batchnorm_eval(*, running_var=1.0, gamma=1.0, eps=1e-5) -> Component:
    """Batch norm in eval mode: diag γ/√(rv+ε): φ = γ²/(rv+ε), ϕ = 0."""
    _check_positive("running_var", running_var, allow_zero=True)
    phi = _f(gamma) ** 2 / (_f(running_var) + _f(eps))
    return _linear("batchnorm_eval", phi, 0.0 * phi, 1.0)


def smn_train(M: int, *, gamma=1.0, eps=0.0) -> Component:
    """Second moment normalization, training mode, M values per channel.

    J = γ/(m̄+ε)·(I − m̄/(m̄+ε)·uuᵀ), m̄² = q_in: JJᵀ has M−1 eigenvalues
    γ²/(m̄+ε)² and one γ²ε²/(m̄+ε)⁴; ε → 0: φ = γ²(1−1/M)/m̄², ϕ = γ⁴(M−1)/(M²m̄⁴).
    q_out = γ²m̄²/(m̄+ε)².
    """
    M = _check_int("M", M)
    if M < 2:
        raise ValueError(f"M must be >= 2 for SMN, got {M}")
    _check_positive("eps", eps, allow_zero=True)
    g2, eps = _f(gamma) ** 2, _f(eps)

    def moments(q):
        mb = jnp.sqrt(_f(q))
        big = g2 / (mb + eps) ** 2
        small = big * (eps / (mb + eps)) ** 2
        phi = ((M - 1) * big + small) / M
        phi2 = ((M - 1) * big**2 + small**2) / M
        return Moments(phi, phi2 - phi**2)

    return Component(f"smn_train(M={M})", moments,
                     lambda q: g2 * _f(q) / (jnp.sqrt(_f(q)) + eps) ** 2, 1.0)


def smn_eval(*, running_rms=1.0, gamma=1.0, eps=1e-5) -> Component:
    """SMN in eval mode: diag γ/(rRMS+ε): φ = γ²/(rRMS+ε)², ϕ = 0."""
    _check_positive("running_rms", running_rms, allow_zero=True)
    phi = _f(gamma) ** 2 / (_f(running_rms) + _f(eps)) ** 2
    return _linear("smn_eval", phi, 0.0 * phi, 1.0)


def sws_conv(c_in: int, c_out: int, kernel_size=3, *, unbiased: bool = True) -> Component:
    """Scaled weight standardization W = √(2/n)(V − mean V)/std V per output filter.

    Squared row norm 2 (population std) or 2(n−1)/n (unbiased std, reference code),
    so φ = 2(n−1)/n or 2; ϕ ≈ φ²·c_out/c_in (Gaussian-like, theory §8).
    """
    c_in, c_out = _check_int("c_in", c_in), _check_int("c_out", c_out)
    k = _check_int("kernel_size", kernel_size)
    n = c_in * k * k
    phi = 2.0 * (n - 1) / n if unbiased else 2.0
    return _linear(f"sws_conv({c_in}->{c_out})", phi, phi**2 * c_out / c_in, c_out / c_in)


# ---------------------------------------------------------------------------
# Other layers
# ---------------------------------------------------------------------------


def dropout(keep_prob) -> Component:
    """Inverted dropout diag(b/p), b ~ Bernoulli(p): φ = 1/p, ϕ = (1−p)/p³; q_out = q/p."""
    _check_positive("keep_prob", keep_prob)
    if not isinstance(keep_prob, jax.core.Tracer) and keep_prob > 1:
        raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob!r}")
    p = _f(keep_prob)
    return _linear(f"dropout({float(keep_prob):g})", 1 / p, (1 - p) / p**3, 1.0)


def avg_pool(k: int) -> Component:
    """k×k average pooling, stride k: φ = 1/k², ϕ = 0; q_out = q/k² for uncorrelated inputs."""
    k = _check_int("k", k)
    return _linear(f"avg_pool({k})", 1.0 / k**2, 0.0, 1.0 / k**2)


def global_avg_pool(hw: int) -> Component:
    """Global average pooling over H·W positions: φ = 1/(HW), ϕ = 0."""
    hw = _check_int("hw", hw)
    return _linear(f"global_avg_pool({hw})", 1.0 / hw, 0.0, 1.0 / hw)


def identity() -> Component:
    """J = I: φ = 1, ϕ = 0."""
    return _linear("identity", 1.0, 0.0, 1.0)


def scale(zeta) -> Component:
    """J = ζI (a scalar multiplier, e.g. a residual branch scale): φ = ζ², ϕ = 0."""
    return _linear(f"scale({float(zeta):g})", _f(zeta) ** 2, 0.0, 1.0)
