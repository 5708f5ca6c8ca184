"""The component library of derivations §8: φ(JJᵀ) and ϕ(JJᵀ) of single layers.

Every component is a `Component`: a pure function of the input second moment q
(``moments(q) -> Moments`` and ``forward(q) -> q_out``, the q-map) plus the
size ratio m/n of its output to its input, which the serial theorem needs
(derivations §3). Values are normalized by the output dimension m (derivations §1.2).
Activations assume a zero-mean Gaussian input N(0, q) (p = ½ for ReLU-like
activations unless given); linear components use the second-moment lemma
(derivations §6): for an isotropic input, ``q_out = φ · q_in``.

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

from gne_jax._tree import is_concrete

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
    "dense_centred",
    "dense_standardized",
    "weightnorm_dense",
    "meanonly_train",
    "subsample_pad",
    "Signal",
    "as_signal",
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
        """ϕ/φ², the quantity that adds along a chain (derivations §3)."""
        return self.varphi / self.phi**2


class Signal(NamedTuple):
    """Forward statistics of the activations entering a layer (per entry).

    q: second moment E[x²]; v: the variance within a channel over the batch
    (E_c Var_batch x_c, what batch norm divides by); m: the global mean E[x].
    Channel means are modelled as N(m, q − v − m²) across channels. A plain float
    q stands for a centred signal ``Signal(q, q, 0)``.
    """

    q: Array
    v: Array
    m: Array


def as_signal(x) -> Signal:
    """``Signal`` from a Signal or a second moment q (centred: v = q, m = 0)."""
    if isinstance(x, Signal):
        return x
    _check_positive("q", x, allow_zero=True)
    q = _f(x)
    return Signal(q, q, jnp.zeros_like(q))


class Component(NamedTuple):
    """A layer of the component library.

    Attributes:
      name: a short label for tables.
      moments: ``x -> Moments`` with x the input second moment q or a `Signal`.
      forward: ``x -> q_out``, the second-moment (q-)map.
      size_ratio: m/n, output size over input size (1 for shape-preserving layers).
      propagate: ``Signal -> Signal``, the full forward map (q, v, m); `compose`
        uses it so that means and batch variances reach normalization layers.
    """

    name: str
    moments: Callable[[Array], Moments]
    forward: Callable[[Array], Array]
    size_ratio: float = 1.0
    propagate: Callable[[Signal], Signal] | None = None


def _make(name: str, moments_sig, propagate, size_ratio: float = 1.0) -> Component:
    """Component from Signal-based ``moments_sig`` and ``propagate``."""
    return Component(
        name,
        lambda x: moments_sig(as_signal(x)),
        lambda x: propagate(as_signal(x)).q,
        float(size_ratio),
        lambda x: propagate(as_signal(x)),
    )


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


def _check_number(name: str, value) -> None:
    """A finite real number (a traced value passes: it is checked where it is concrete)."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (bool, str, bytes)) or not np.issubdtype(
            np.asarray(value).dtype, np.number) or np.iscomplexobj(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not np.all(np.isfinite(np.asarray(value))):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _label(value, fmt: str = "g") -> str:
    """``value`` for a component's name; a traced value (under jit/vmap) is named ``·``."""
    if isinstance(value, jax.core.Tracer):
        return "·"
    return format(float(value), fmt)


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


def _linear(name: str, phi: Array, varphi: Array, size_ratio: float, *,
            centred: bool = False) -> Component:
    """A random zero-mean linear map: q' = φq, v' = φv, m' = 0 (output channel means are
    random with zero average). ``centred`` (zero-mean rows) also removes the common
    input mean: q' = φ(q − m²)."""
    mom = Moments(_f(phi), _f(varphi))

    def propagate(sig):
        q = sig.q - sig.m**2 if centred else sig.q
        return Signal(mom.phi * q, mom.phi * sig.v, jnp.zeros_like(sig.m))

    return _make(name, lambda sig: mom, propagate, size_ratio)


def _diag_linear(name: str, c2, varphi=0.0, *, mean_gain=None, size_ratio=1.0) -> Component:
    """A fixed diagonal-like map that keeps means: x ↦ c·x (φ = c²)."""
    c2 = _f(c2)
    mom = Moments(c2, _f(varphi))
    mg = jnp.sqrt(c2) if mean_gain is None else _f(mean_gain)
    return _make(name, lambda sig: mom, lambda sig: Signal(c2 * sig.q, c2 * sig.v, mg * sig.m),
                 size_ratio)


def _border_profile(size: int, k: int, stride: int, pad: int) -> np.ndarray:
    """Fraction of the k taps of each output position (one axis) that hit the input."""
    out = (size + 2 * pad - k) // stride + 1
    o = np.arange(out)[:, None] * stride - pad + np.arange(k)[None, :]
    return ((o >= 0) & (o < size)).mean(axis=1)


def _conv_position_factors(input_hw, k, stride, padding) -> np.ndarray:
    """Per output position, the fraction of valid kernel taps (zero padding at borders)."""
    if input_hw is None:
        return np.ones(1)
    h, w = (input_hw, input_hw) if np.isscalar(input_hw) else input_hw
    pad = k // 2 if padding is None else padding
    fh = _border_profile(int(h), k, stride, pad)
    fw = _border_profile(int(w), k, stride, pad)
    return (fh[:, None] * fw[None, :]).ravel()


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
    c_in: int, c_out: int, kernel_size=3, *, stride: int = 1, sigma2=None, gain=None,
    input_hw=None, padding=None, centred: bool = False,
) -> Component:
    """Convolution with an i.i.d. N(0, σ²) kernel (σ² = gain²/fan_in if ``gain`` is given).

    φ = c_in·k_h·k_w·σ² in the interior; with ``input_hw`` the zero-padded borders are
    modelled exactly for φ (each output position keeps its fraction f of valid taps,
    φ_pos = fan_in·σ²·f). ϕ ≈ E[φ_pos²]·c_out/(c_in·stride²) + Var(φ_pos) (the
    Marchenko–Pastur-like spread with the size ratio, derivations §8, plus the spread of
    row norms across positions; strided convolutions are not covered by the derivations).
    ``centred`` (zero-mean filters, `CenteredConv`): fan_in → fan_in − 1 and the
    common input mean is removed.
    """
    c_in, c_out = _check_int("c_in", c_in), _check_int("c_out", c_out)
    k = _check_int("kernel_size", kernel_size)
    stride = _check_int("stride", stride)
    fan_in = c_in * k * k
    if sigma2 is not None and gain is not None:
        raise ValueError("give either sigma2 or gain, not both")
    if sigma2 is None:
        gain = 1.0 if gain is None else gain
        _check_positive("gain", gain)
        sigma2 = _f(gain) ** 2 / fan_in
    _check_positive("sigma2", sigma2)
    eff = fan_in - 1 if centred else fan_in
    f = _conv_position_factors(input_hw, k, stride, padding)
    phi_pos = eff * _f(sigma2) * jnp.asarray(f, dtype=jnp.result_type(float))
    ratio = c_out / (c_in * stride * stride)
    phi = jnp.mean(phi_pos)
    varphi = jnp.mean(phi_pos**2) * ratio + jnp.var(phi_pos)
    return _linear(f"conv({c_in}->{c_out},k{k},s{stride})", phi, varphi, ratio,
                   centred=centred)


def conv_orthogonal_flat(c_in: int, c_out: int, kernel_size=3, *, gain=1.0, stride: int = 1,
                         input_hw=None, padding=None) -> Component:
    """Conv whose flattened kernel (c_out × c_in·k²) has orthonormal rows × gain.

    φ = gain² in the interior (borders as in `conv_gaussian`); ϕ > 0 in general
    (overlapping shifted filters) is not derived (derivations §8) and is approximated by
    the spread of φ across positions only. Delta-orthogonal kernels give ϕ = 0.
    """
    c_in, c_out = _check_int("c_in", c_in), _check_int("c_out", c_out)
    k, stride = _check_int("kernel_size", kernel_size), _check_int("stride", stride)
    _check_positive("gain", gain)
    rows = min(1.0, c_in * k * k / c_out)  # orthonormal rows (or columns when c_out > fan_in)
    f = _conv_position_factors(input_hw, k, stride, padding)
    phi_pos = _f(gain) ** 2 * rows * jnp.asarray(f, dtype=jnp.result_type(float))
    return _linear(f"conv_orthogonal({c_in}->{c_out})", jnp.mean(phi_pos), jnp.var(phi_pos),
                   c_out / (c_in * stride * stride))


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


def delta_orthogonal(c_in: int, c_out: int, *, gain=1.0, stride: int = 1,
                     scale_by_fan_ratio: bool = False) -> Component:
    """Delta-orthogonal conv: centre tap a c_out × c_in Haar block, other taps 0.

    With ``scale_by_fan_ratio`` (the reference code; same flag as
    `gne_jax.nn.initializers.delta_orthogonal`) the block is multiplied by
    gain·√(c_out/c_in): c_out ≥ c_in: φ = gain², ϕ = gain⁴(c_out/c_in − 1);
    c_out < c_in: φ = gain²·c_out/c_in, ϕ = 0. Without it the multiplier is ``gain``
    and the moments are those of `orthogonal` (per spatial position).
    """
    c_in, c_out = _check_int("c_in", c_in), _check_int("c_out", c_out)
    stride = _check_int("stride", stride)
    mult = _f(gain) * (math.sqrt(c_out / c_in) if scale_by_fan_ratio else 1.0)
    comp = orthogonal(c_in, c_out, gain=mult)
    ratio = c_out / (c_in * stride * stride)
    # keep the full forward map (`propagate`): the output channel means are random with zero
    # average, exactly as for `orthogonal`, so a ReLU after it sees a centred input
    return comp._replace(name=f"delta_orthogonal({c_in}->{c_out})", size_ratio=float(ratio))


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


_SQRT2PI = math.sqrt(2.0 * math.pi)
_SQRT2 = math.sqrt(2.0)


def _npdf(x):
    return jnp.exp(-(x**2) / 2) / _SQRT2PI


def _ncdf(x):
    return jax.scipy.stats.norm.cdf(x)


def _pos_moments(m, s):
    """E[x·1{x>0}] and E[x²·1{x>0}] for x ~ N(m, s²) (s > 0)."""
    t = m / s
    e1 = m * _ncdf(t) + s * _npdf(t)
    e2 = (m**2 + s**2) * _ncdf(t) + m * s * _npdf(t)
    return e1, e2


def _leaky_mean(mu, s, a):
    """E f(x), f = leaky ReLU with slope a, x ~ N(mu, s²)."""
    e1, _ = _pos_moments(mu, s)
    return e1 + a * (mu - e1)


def _channel_mean_sq(mean_fn, sig: Signal, degree: int = 48) -> Array:
    """E_c[(E[f | channel c])²] with channel means μ_c ~ N(m, d), d = q − v − m²."""
    d = jnp.maximum(sig.q - sig.v - sig.m**2, 0.0)
    x, w = _gh(degree)
    dt = jnp.result_type(float)
    mu = sig.m + jnp.sqrt(d) * jnp.asarray(x, dt)
    return jnp.sum(jnp.asarray(w, dt) * mean_fn(mu) ** 2)


def _tiny():
    return jnp.finfo(jnp.result_type(float)).tiny


def leaky_relu(negative_slope=0.01, *, p=None) -> Component:
    """diag(1 or a): φ = p + a²(1−p), ϕ = p + a⁴(1−p) − φ².

    p = P(x > 0) is taken from the input signal, x ~ N(m, q − m²) (p = ½ for a
    centred input) unless given. The forward map uses the Gaussian closed forms
    (q' = (1+a²)q/2 for a centred input) and tracks the output mean and the
    within-channel variance, which batch norm after the next layer sees.
    """
    _check_number("negative_slope", negative_slope)
    if p is not None:
        _check_positive("p", p)
        if not isinstance(p, jax.core.Tracer) and p > 1:
            raise ValueError(f"p must be in (0, 1], got {p!r}")
    a = _f(negative_slope)

    def moments(sig):
        if p is None:
            s = jnp.sqrt(jnp.maximum(sig.q - sig.m**2, _tiny()))
            pp = _ncdf(sig.m / s)
        else:
            pp = _f(p) + 0.0 * sig.q
        phi = pp + a**2 * (1 - pp)
        return Moments(phi, pp + a**4 * (1 - pp) - phi**2)

    def propagate(sig):
        s = jnp.sqrt(jnp.maximum(sig.q - sig.m**2, _tiny()))
        e1, e2 = _pos_moments(sig.m, s)
        # negative part: E[x²1{x<0}] = q − e2, E[x1{x<0}] = m − e1
        q_out = e2 + a**2 * (sig.q - e2)
        m_out = e1 + a * (sig.m - e1)
        sv = jnp.sqrt(jnp.maximum(sig.v, _tiny()))
        v_out = q_out - _channel_mean_sq(lambda mu: _leaky_mean(mu, sv, a), sig)
        return Signal(q_out, jnp.maximum(v_out, 0.0), m_out)

    return _make(f"leaky_relu({_label(negative_slope)})", moments, propagate)


def relu(*, p=None) -> Component:
    """D = diag(1_{x>0}): φ = p, ϕ = p(1−p) (p = ½ for a centred input); q_out = q/2."""
    return leaky_relu(0.0, p=p)._replace(name="relu")


def prelu(slope=0.25, *, p=None) -> Component:
    """PReLU at its current slope a (init 0.25: φ = 0.53125, ϕ = 0.2197): as leaky ReLU."""
    return leaky_relu(slope, p=p)._replace(name=f"prelu({_label(slope)})")


def sprelu(slope=0.25, *, p=None) -> Component:
    """sPReLU = PReLU_a(x)/√(1+a²): φ = ½, ϕ = ¼((1−a²)/(1+a²))² at p = ½."""
    base = leaky_relu(slope, p=p)
    c2 = 1.0 / (1.0 + _f(slope) ** 2)

    def moments(sig):
        m = base.moments(sig)
        return Moments(m.phi * c2, m.varphi * c2**2)

    def propagate(sig):
        o = base.propagate(sig)
        return Signal(o.q * c2, o.v * c2, o.m * jnp.sqrt(c2))

    return _make(f"sprelu({_label(slope)})", moments, propagate)


def _moments_from_derivative(dfn, q, degree, method="gauss_hermite", mean=0.0) -> Moments:
    d2 = lambda h: dfn(h + mean) ** 2
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


def _smooth(name, fn, dfn, degree, closed_moments=None) -> Component:
    """Elementwise smooth activation: Gauss–Hermite over the marginal N(m, q − m²)."""

    def moments(sig):
        var = jnp.maximum(sig.q - sig.m**2, 0.0)
        if closed_moments is not None:
            # closed forms are for a centred input; use them when m = 0
            cm = closed_moments(var)
            gm = _moments_from_derivative(dfn, var, degree, mean=sig.m)
            use = sig.m == 0
            return Moments(jnp.where(use, cm.phi, gm.phi), jnp.where(use, cm.varphi, gm.varphi))
        return _moments_from_derivative(dfn, var, degree, mean=sig.m)

    def propagate(sig):
        var = jnp.maximum(sig.q - sig.m**2, 0.0)
        q_out = gaussian_expectation(lambda h: fn(h + sig.m) ** 2, var, degree=degree)
        m_out = gaussian_expectation(lambda h: fn(h + sig.m), var, degree=degree)
        x, w = _gh(32)
        dt = jnp.result_type(float)
        sv = jnp.sqrt(jnp.maximum(sig.v, 0.0))
        cmean = lambda mu: jnp.sum(jnp.asarray(w, dt) * fn(mu[:, None] + sv * jnp.asarray(x, dt)),
                                   axis=1)
        v_out = q_out - _channel_mean_sq(cmean, sig, degree=32)
        return Signal(q_out, jnp.maximum(v_out, 0.0), m_out)

    return _make(name, moments, propagate)


def tanh(*, degree: int = 256) -> Component:
    """tanh activation; q_out = E[tanh²h], h ~ N(0, q) (Gauss–Hermite)."""
    return _smooth("tanh", jnp.tanh, _sech2, degree,
                   lambda var: tanh_moments(var, degree=degree))


def sigmoid(*, degree: int = 256) -> Component:
    """Logistic sigmoid; q_out = E[s(h)²] (non-zero mean: this is a second moment)."""
    ds = lambda h: jax.nn.sigmoid(h) * (1 - jax.nn.sigmoid(h))
    return _smooth("sigmoid", jax.nn.sigmoid, ds, degree,
                   lambda var: sigmoid_moments(var, degree=degree))


def smooth_activation(fn: Callable[[Array], Array], name: str = "activation", *,
                      degree: int = 256) -> Component:
    """Any elementwise activation: φ = E[f'(h)²], ϕ = E[f'(h)⁴] − φ², q_out = E[f(h)²].

    f' is taken with ``jax.grad``; expectations by Gauss–Hermite quadrature over
    h ~ N(m, q − m²), so accuracy is best for smooth f.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    dfn = lambda h: jax.vmap(jax.grad(lambda x: jnp.sum(fn(x))))(h.ravel()).reshape(h.shape)
    return _smooth(name, fn, dfn, degree)


def selu_moments(lam, alpha, v) -> Moments:
    """SELU(λ, α) with pre-activation N(0, v) (closed forms, derivations §8 / §11).

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
    """SELU with given (λ, α); closed forms for a centred input (m = 0).

    For the depth-aware coefficients use ``gne_jax.theory.depth_aware_selu`` (the
    solver is `gne_jax.nn.activations.selu_coefficients`, one implementation).
    """
    _check_positive("lam", lam)
    _check_positive("alpha", alpha, allow_zero=True)
    lam_, alpha_ = _f(lam), _f(alpha)
    fn = lambda h: lam_ * jnp.where(h > 0, h, alpha_ * jnp.expm1(jnp.minimum(h, 0.0)))

    def propagate(sig):
        q_out = _selu_second_moment(lam, alpha, sig.q)
        m_out = gaussian_expectation(fn, sig.q)
        return Signal(q_out, jnp.maximum(q_out - m_out**2, 0.0), m_out)

    return _make(f"selu({_label(lam, '.4g')},{_label(alpha, '.4g')})",
                 lambda sig: selu_moments(lam, alpha, sig.q), propagate)


# ---------------------------------------------------------------------------
# Normalization (training mode: batch-coupled Jacobian, derivations §1.4)
# ---------------------------------------------------------------------------


def _jensen(rank, fan_in=None):
    """Channel average of ‖w‖²/(wᵀΣw) and of its square, relative to its mean-field value.

    For Gaussian w over n = fan_in inputs whose batch covariance Σ is flat on r of
    them (σ_c² ∝ A ~ χ²_r, ‖w‖² ∝ A + B, B ~ χ²_{n−r}):
    E[ratio] = (r/n)(1 + (n−r)/(r−2)), E[ratio²] = (r/n)²(1 + 2(n−r)/(r−2) +
    ((n−r)² + 2(n−r))/((r−2)(r−4))). r = n gives 1 (white input: no correction).
    """
    if rank is None:
        return 1.0, 1.0
    r = float(rank)
    n = r if fan_in is None else float(max(fan_in, rank))
    k = n - r
    e1 = (r / n) * (1 + k / (r - 2))
    e2 = (r / n) ** 2 * (1 + 2 * k / (r - 2) + (k * k + 2 * k) / ((r - 2) * (r - 4)))
    return e1, e2


def _batch_layer_args(what, M, minimum, gamma, eps, rank, fan_in):
    """Checked (M, γ², ε, Jensen factors) of a batch-statistics layer over M values."""
    M = _check_int("M", M)
    if M < minimum:
        raise ValueError(f"M must be >= {minimum} for {what}, got {M}")
    _check_positive("eps", eps, allow_zero=True)
    if rank is not None and int(rank) < 5:
        raise ValueError(f"rank must be >= 5 (or None), got {rank!r}")
    return M, _f(gamma) ** 2, _f(eps), _jensen(rank, fan_in)


def _spiked_moments(M, n_big, big, ratio, corr) -> Moments:
    """Moments of an M×M JJᵀ with ``n_big`` eigenvalues ``big``, one ``big·ratio`` and the
    rest 0, times the channel-average factors ``corr = (c₁, c₂)``."""
    c1, c2 = corr
    small = big * ratio
    phi = c1 * (n_big * big + small) / M
    phi2 = c2 * (n_big * big**2 + small**2) / M
    return Moments(phi, phi2 - phi**2)


def batchnorm_train(M: int, *, gamma=1.0, eps=0.0, rank=None, fan_in=None) -> Component:
    """Batch norm in training mode, one channel of M values sharing the statistics.

    JJᵀ has M−2 eigenvalues γ²/(σ²+ε), one γ²ε²/(σ²+ε)³ (along x̂) and one 0 (along 1),
    so for ε → 0: φ = γ²(1−2/M)/σ², ϕ = γ⁴·2(M−2)/(M²σ⁴). σ² is the within-channel
    batch variance v of the input signal (= q for a centred float input).
    Output: q' = v' = γ²σ²/(σ²+ε), m' = 0 (β = 0).

    ``rank``, ``fan_in`` [derived]: when the channel's input is wᵀh for Gaussian
    weights w over ``fan_in`` inputs whose batch covariance is flat on ``rank`` r of
    them (r = min(M − 1, fan_in)), the per-channel φ_c ∝ ‖w‖²/σ_c² varies across
    channels; its channel average (and that of φ_c²) is used (see `_jensen`; 1 for
    r = fan_in). ``None``: no correction.
    """
    M, g2, eps, corr = _batch_layer_args("batch norm", M, 3, gamma, eps, rank, fan_in)

    def moments(sig):
        s = sig.v + eps
        return _spiked_moments(M, M - 2, g2 / s, (eps / s) ** 2, corr)

    def propagate(sig):
        q = g2 * sig.v / (sig.v + eps)
        return Signal(q, q, jnp.zeros_like(q))

    return _make(f"batchnorm_train(M={M})", moments, propagate)


def batchnorm_eval(*, running_var=1.0, gamma=1.0, eps=1e-5) -> Component:
    """Batch norm in eval mode (running mean 0): diag γ/√(rv+ε): φ = γ²/(rv+ε), ϕ = 0."""
    _check_positive("running_var", running_var, allow_zero=True)
    _check_positive("eps", eps, allow_zero=True)
    _check_number("gamma", gamma)
    if is_concrete((running_var, eps)) and float(running_var) + float(eps) <= 0:
        raise ValueError("running_var + eps must be > 0 (the layer divides by its root)")
    return _diag_linear("batchnorm_eval", _f(gamma) ** 2 / (_f(running_var) + _f(eps)))


def smn_train(M: int, *, gamma=1.0, eps=0.0, rank=None, fan_in=None) -> Component:
    """Second moment normalization, training mode, M values per channel.

    J = γ/(m̄+ε)·(I − m̄/(m̄+ε)·uuᵀ), m̄² = q_in: JJᵀ has M−1 eigenvalues
    γ²/(m̄+ε)² and one γ²ε²/(m̄+ε)⁴; ε → 0: φ = γ²(1−1/M)/m̄², ϕ = γ⁴(M−1)/(M²m̄⁴).
    Output: x·γ/(m̄+ε) (means and variances scale alike). ``rank``: the channel-to-
    channel Jensen correction of `batchnorm_train` (for ε ≪ m̄).
    """
    M, g2, eps, corr = _batch_layer_args("SMN", M, 2, gamma, eps, rank, fan_in)

    def moments(sig):
        mb = jnp.sqrt(sig.q)
        return _spiked_moments(M, M - 1, g2 / (mb + eps) ** 2, (eps / (mb + eps)) ** 2, corr)

    def propagate(sig):
        c = jnp.sqrt(g2) / (jnp.sqrt(sig.q) + eps)
        return Signal(c**2 * sig.q, c**2 * sig.v, c * sig.m)

    return _make(f"smn_train(M={M})", moments, propagate)


def smn_eval(*, running_rms=1.0, gamma=1.0, eps=1e-5) -> Component:
    """SMN in eval mode: diag γ/(rRMS+ε): φ = γ²/(rRMS+ε)², ϕ = 0."""
    _check_positive("running_rms", running_rms, allow_zero=True)
    _check_positive("eps", eps, allow_zero=True)
    _check_number("gamma", gamma)
    if is_concrete((running_rms, eps)) and float(running_rms) + float(eps) <= 0:
        raise ValueError("running_rms + eps must be > 0 (the layer divides by it)")
    return _diag_linear("smn_eval", _f(gamma) ** 2 / (_f(running_rms) + _f(eps)) ** 2)


def meanonly_train(M: int) -> Component:
    """Mean-only batch norm, training mode: J = I − 11ᵀ/M per channel (a projection):
    φ = 1 − 1/M, ϕ = (M−1)/M²; output q' = v' = v, m' = 0."""
    M = _check_int("M", M)
    phi = 1.0 - 1.0 / M
    mom = Moments(_f(phi), _f(phi * (1 - phi)))
    return _make(f"meanonly_train(M={M})", lambda sig: mom,
                 lambda sig: Signal(sig.v, sig.v, jnp.zeros_like(sig.m)))


def dense_centred(fan_in: int, fan_out: int, *, sigma2=None, gain=None) -> Component:
    """Dense layer with zero-mean rows (``CenteredDense``, SMN recipe): φ = (n−1)σ²,
    ϕ ≈ φ²(m+1)/n; the common input mean is removed."""
    base = dense_gaussian(fan_in, fan_out, sigma2=sigma2, gain=gain)
    m0 = base.moments(1.0)
    c = (fan_in - 1) / fan_in
    return _linear(f"dense_centred({fan_in}->{fan_out})", m0.phi * c, m0.varphi * c**2,
                   fan_out / fan_in, centred=True)


def dense_standardized(fan_in: int, fan_out: int, *, gain=_SQRT2,
                       unbiased: bool = False) -> Component:
    """Dense layer with scaled weight standardization: rows centred with squared norm
    gain² (population std) or gain²(n−1)/n (unbiased): φ = that, ϕ ≈ φ²·m/n (fixed
    row norms: no (m+1)/n row-norm term)."""
    n, m = _check_int("fan_in", fan_in), _check_int("fan_out", fan_out)
    phi = _f(gain) ** 2 * ((n - 1) / n if unbiased else 1.0)
    return _linear(f"dense_sws({n}->{m})", phi, phi**2 * m / n, m / n, centred=True)


def sws_conv(c_in: int, c_out: int, kernel_size=3, *, gain=_SQRT2, unbiased=False,
             stride: int = 1, input_hw=None, padding=None) -> Component:
    """Scaled weight standardization W = gain/√n·(V − mean V)/std V per output filter.

    Squared row norm gain² (population std, the library default) or gain²(n−1)/n
    (unbiased std, reference code): φ = that (× the border factor with
    ``input_hw``), ϕ ≈ φ²·c_out/(c_in·stride²); the common input mean is removed.
    """
    c_in, c_out = _check_int("c_in", c_in), _check_int("c_out", c_out)
    k, stride = _check_int("kernel_size", kernel_size), _check_int("stride", stride)
    n = c_in * k * k
    row = _f(gain) ** 2 * ((n - 1) / n if unbiased else 1.0)
    f = jnp.asarray(_conv_position_factors(input_hw, k, stride, padding), jnp.result_type(float))
    phi_pos = row * f
    ratio = c_out / (c_in * stride * stride)
    return _linear(f"sws_conv({c_in}->{c_out},s{stride})", jnp.mean(phi_pos),
                   jnp.mean(phi_pos**2) * ratio + jnp.var(phi_pos), ratio, centred=True)


def weightnorm_dense(fan_in: int, fan_out: int, *, gain=1.0) -> Component:
    """Salimans weight norm g·V/‖V‖ with g = gain: rows of squared norm gain²: φ = gain²,
    ϕ ≈ φ²·m/n (fixed row norms), means not removed."""
    n, m = _check_int("fan_in", fan_in), _check_int("fan_out", fan_out)
    phi = _f(gain) ** 2
    return _linear(f"weightnorm({n}->{m})", phi, phi**2 * m / n, m / n)


# ---------------------------------------------------------------------------
# Other layers
# ---------------------------------------------------------------------------


def dropout(keep_prob) -> Component:
    """Inverted dropout diag(b/p), b ~ Bernoulli(p): φ = 1/p, ϕ = (1−p)/p³; q_out = q/p."""
    _check_positive("keep_prob", keep_prob)
    if not isinstance(keep_prob, jax.core.Tracer) and keep_prob > 1:
        raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob!r}")
    p = _f(keep_prob)
    mom = Moments(1 / p, (1 - p) / p**3)
    return _make(f"dropout({_label(keep_prob)})", lambda sig: mom,
                 lambda sig: Signal(sig.q / p, sig.v + sig.q * (1 / p - 1), sig.m))


def _pool(name, k2) -> Component:
    """Averaging k2 spatially uncorrelated values of one channel: φ = 1/k2, ϕ = 0; the mean
    and the channel-mean dispersion are kept, the within-channel variance shrinks ×1/k2."""
    mom = Moments(_f(1.0 / k2), _f(0.0))

    def propagate(sig):
        d = jnp.maximum(sig.q - sig.v - sig.m**2, 0.0)
        v = sig.v / k2
        return Signal(sig.m**2 + d + v, v, sig.m)

    return _make(name, lambda sig: mom, propagate, 1.0 / k2)


def avg_pool(k: int) -> Component:
    """k×k average pooling, stride k: φ = 1/k², ϕ = 0."""
    k = _check_int("k", k)
    return _pool(f"avg_pool({k})", k * k)


def global_avg_pool(hw: int) -> Component:
    """Global average pooling over H·W positions: φ = 1/(HW), ϕ = 0."""
    hw = _check_int("hw", hw)
    return _pool(f"global_avg_pool({hw})", hw)


def subsample_pad(c_in: int, c_out: int, stride: int = 2) -> Component:
    """ResNet down-sampling shortcut: keep every stride-th position, append c_out − c_in zero
    channels. JJᵀ = diag(1 on real channels, 0 on padded): φ = c_in/c_out, ϕ = φ(1 − φ)."""
    c_in, c_out, stride = _check_int("c_in", c_in), _check_int("c_out", c_out), _check_int(
        "stride", stride)
    if c_out < c_in:
        raise ValueError(f"c_out must be >= c_in, got {c_in} -> {c_out}")
    r = c_in / c_out
    mom = Moments(_f(r), _f(r * (1 - r)))
    return _make(f"subsample_pad({c_in}->{c_out})", lambda sig: mom,
                 lambda sig: Signal(r * sig.q, r * sig.v, r * sig.m),
                 c_out / (c_in * stride * stride))


def identity() -> Component:
    """J = I: φ = 1, ϕ = 0."""
    return _diag_linear("identity", 1.0)


def scale(zeta) -> Component:
    """J = ζI (a scalar multiplier, e.g. a residual branch scale): φ = ζ², ϕ = 0."""
    _check_number("zeta", zeta)
    return _diag_linear(f"scale({_label(zeta)})", _f(zeta) ** 2, mean_gain=_f(zeta))
